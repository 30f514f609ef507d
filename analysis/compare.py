"""Several models' analyses side by side: one markdown table from their ``analysis.json`` files
(``geocap analyze``), so an object-based model (ORT) and a patch-based one can be read together.

One row per (measure, model): the per-layer value of each layer, with its standard error over
images where the analysis gives one, then the change from the first to the last layer and the
analysis' own verdict on it (``rises`` / ``falls`` beyond two standard errors, else ``no change
beyond its uncertainty``; :mod:`.uncertainty`). Models of different depths share the table: a
shallower model's missing layers are blank. The controlled measures come first (:data:`CONTROLLED`: each
layer's mean with its 95 % interval over images, and the verdict of each layer: positive or negative
where the interval excludes 0, else inconclusive). Naive measures: normalised attention entropy (1 = uniform)
of encoder self-, decoder self- and cross-attention; Spearman's rho of encoder attention with
distance (no standard error: one correlation over a pair sample); grounding accuracy of cross-
attention (with its chance rate). Numbers are not comparable across models in absolute terms
(different numbers of objects: 197 patches vs a handful of objects); the depth trends are.
:func:`comparison_figure` draws the same measures, one panel each, one line per model.
"""
from __future__ import annotations

import math
from typing import Mapping

__all__ = ["MEASURES", "comparison_figure", "comparison_table"]

# the controlled measures the verdicts rest on: (label, path into analysis.json to the per-layer list of
# {mean, ci95, images} entries, format)
CONTROLLED = (
    ("proximity, controlled: distance given similarity", ("proximity", "per_image", "distance_given_similarity"),
     "+.3f"),
    ("thematic, controlled: same cluster given similarity", ("thematic", "per_image", "cluster_given_similarity"),
     "+.3f"),
    ("grounding, controlled: referent effect", ("grounding", "referent_effect"), "+.1%"),
)
# the naive, descriptive measures: (label, path to the per-layer list, path to its uncertainty dict or None,
# format)
MEASURES = (
    ("entropy, encoder self", ("entropy", "per_layer", "encoder_self"),
     ("entropy", "per_layer_uncertainty", "encoder_self"), ".3f"),
    ("entropy, decoder self", ("entropy", "per_layer", "decoder_self"),
     ("entropy", "per_layer_uncertainty", "decoder_self"), ".3f"),
    ("entropy, cross", ("entropy", "per_layer", "cross"), ("entropy", "per_layer_uncertainty", "cross"), ".3f"),
    ("proximity: Spearman(attention, distance)", ("proximity", "spearman_distance"), None, "+.3f"),
    ("grounding accuracy", ("grounding", "accuracy"), ("grounding", "uncertainty", "accuracy"), ".1%"),
)


def _get(tree: Mapping, path: tuple):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cell(value, se, fmt: str) -> str:
    if not _finite(value):
        return "n/a"
    text = format(value, fmt)
    if _finite(se):
        text += f" ± {format(se, fmt.lstrip('+'))}"
    return text


def _interval_cell(entry, fmt: str) -> str:
    if not isinstance(entry, Mapping) or not _finite(entry.get("mean")):
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{format(entry['mean'], fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"


def _why(analysis: Mapping, path: tuple) -> str | None:
    """The analysis' reason for a missing measure (its ``unavailable`` entry naming the measure)."""
    reasons = _get(analysis, (path[0], "unavailable"))
    if not isinstance(reasons, Mapping):
        return None
    name = ".".join(path[1:]) if path[1] == "per_image" else path[-1]
    return reasons.get(name) or next((v for k, v in reasons.items() if path[-1] in k or k in path), None)


def _missing_row(label: str, name: str, analysis: Mapping, path: tuple, depth: int) -> str:
    """The table row of a measure ``analysis`` lacks: blank layers and the analysis' reason."""
    why = _why(analysis, path)
    return f"| {label} | {name} | " + " | ".join([""] * depth) + f" | not measured{': ' + why if why else ''} |"


def _controlled_rows(analyses: Mapping[str, Mapping], depth: int) -> list[str]:
    """A row per (controlled measure, model): each layer's mean [95 % interval over images] and the
    verdicts (:func:`.uncertainty.layer_verdicts`)."""
    from .uncertainty import layer_verdicts

    lines = []
    for label, path, fmt in CONTROLLED:
        for name, analysis in analyses.items():
            entries = _get(analysis, path)
            if not entries:
                lines.append(_missing_row(label, name, analysis, path, depth))
                continue
            cells = [_interval_cell(e, fmt) for e in entries] + [""] * (depth - len(entries))
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {layer_verdicts(entries)} |")
    return lines


def comparison_table(analyses: Mapping[str, Mapping]) -> str:
    """The markdown table of ``analyses`` (``{model name: analysis.json dict}``, in column order):
    the controlled measures first (mean [95 % interval over images] per layer, and the verdict of
    each layer), then the naive, descriptive ones; with a line under it giving each model's
    grounding chance and grounded tokens."""
    paths = [m[1] for m in MEASURES] + [m[1] for m in CONTROLLED]
    depth = max((len(_get(a, p) or []) for a in analyses.values() for p in paths), default=0)
    header = ["measure", "model"] + [f"layer {i + 1}" for i in range(depth)] + ["first -> last layer / verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += _controlled_rows(analyses, depth)
    for label, path, se_path, fmt in MEASURES:
        for name, analysis in analyses.items():
            values = _get(analysis, path)
            if not values:
                lines.append(_missing_row(label, name, analysis, path, depth))
                continue
            summary = _get(analysis, se_path) if se_path else None
            se = (summary or {}).get("se") or [None] * len(values)
            cells = [_cell(v, s, fmt) for v, s in zip(values, se)] + [""] * (depth - len(values))
            if summary and _finite(summary.get("change")):
                change = _cell(summary['change'], summary.get('change_se'), '+' + fmt.lstrip('+'))
                trend = f"{change}: {summary['trend']}"
            elif len(values) > 1 and _finite(values[0]) and _finite(values[-1]):
                trend = f"{format(values[-1] - values[0], '+' + fmt.lstrip('+'))} (no standard error)"
            else:
                trend = "one layer" if len(values) == 1 else "n/a"
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {trend} |")
    notes = []
    for name, analysis in analyses.items():
        chance, tokens = _get(analysis, ("grounding", "chance")), _get(analysis, ("grounding", "tokens"))
        if _finite(chance) and tokens:
            notes.append(f"{name}: chance {chance:.1%} over {tokens} grounded tokens")
        else:
            notes.append(f"{name}: no grounded tokens")
    return ("\n".join(lines) + "\n\nVerdicts: 'positive' / 'negative' where a layer's 95 % interval over images "
            "excludes 0, else 'inconclusive'. Grounding chance (a uniformly random pick): " + "; ".join(notes) + ".\n")


def comparison_figure(analyses: Mapping[str, Mapping], path) -> None:
    """Top row: one panel per controlled measure of :data:`CONTROLLED`, each model a line over its
    layers with its 95 % interval over images shaded, 0 drawn. Bottom row: one panel per naive
    measure of :data:`MEASURES`, each model a line with one standard error as error bars (grounding:
    each model's chance dashed in its colour). PNG at ``path``."""
    import numpy as np

    from .plotting import interval_series, layer_axis, mark_missing, new_figure, save_figure

    fig, top = new_figure(len(MEASURES))
    fig.set_size_inches(fig.get_size_inches()[0], 7.6)
    for ax in top:
        ax.remove()
    grid = fig.add_gridspec(2, len(MEASURES))
    controlled = [fig.add_subplot(grid[0, k]) for k in range(len(CONTROLLED))]
    axes = [fig.add_subplot(grid[1, k]) for k in range(len(MEASURES))]
    for ax, (label, path_, fmt) in zip(controlled, CONTROLLED):
        drawn = False
        for k, (name, analysis) in enumerate(analyses.items()):
            entries = _get(analysis, path_)
            if not entries:
                continue
            mean, low, high = interval_series(entries)
            layers = np.arange(1, len(mean) + 1)
            ax.plot(layers, np.ma.masked_invalid(mean), marker="o", color=f"C{k}", label=name)
            ax.fill_between(layers, low, high, color=f"C{k}", alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            mark_missing(ax, label, "no model has it")
            continue
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_title(label + " (95 % CI)", fontsize=10)
        layer_axis(ax)
        if fmt.endswith("%"):
            ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
        ax.legend(fontsize=8)
    for ax, (label, path_, se_path, fmt) in zip(axes, MEASURES):
        drawn = False
        for k, (name, analysis) in enumerate(analyses.items()):
            values = _get(analysis, path_)
            if not values:
                continue
            values = np.array([v if _finite(v) else np.nan for v in values], dtype=float)
            summary = _get(analysis, se_path) if se_path else None
            se = None
            if summary and summary.get("se") is not None:
                se = np.ma.masked_invalid(np.array([v if _finite(v) else np.nan for v in summary["se"]], float))
            colour = f"C{k}"
            ax.errorbar(np.arange(1, len(values) + 1), values, yerr=se, capsize=3, marker="o", color=colour,
                        label=name)
            chance = _get(analysis, ("grounding", "chance")) if path_[0] == "grounding" else None
            if _finite(chance):
                ax.axhline(chance, color=colour, linestyle="--", linewidth=1, label=f"{name}: chance")
            drawn = True
        if not drawn:
            mark_missing(ax, label, "no model has it")
            continue
        ax.set_title(label, fontsize=10)
        layer_axis(ax)
        if fmt.endswith("%"):
            ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
        ax.legend(fontsize=8)
    save_figure(fig, path)
