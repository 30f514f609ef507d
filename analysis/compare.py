"""Several models' analyses side by side: one markdown table from their ``analysis.json`` files
(``geocap analyze``), so an object-based model (ORT) and a patch-based one can be read together.

One row per (measure, model): the per-layer value of each layer, with its standard error over
images where the analysis gives one, then the change from the first to the last layer and the
analysis' own verdict on it (``rises`` / ``falls`` beyond two standard errors, else ``no change
beyond its uncertainty``; :mod:`.uncertainty`). Models of different depths share the table: a
shallower model's missing layers are blank. Measures: normalised attention entropy (1 = uniform)
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

# (label, path into analysis.json to the per-layer list, path to its uncertainty dict or None, format)
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


def comparison_table(analyses: Mapping[str, Mapping]) -> str:
    """The markdown table of ``analyses`` (``{model name: analysis.json dict}``, in column order),
    with a line under it giving each model's grounding chance and grounded tokens."""
    depth = max((len(_get(a, m[1]) or []) for a in analyses.values() for m in MEASURES), default=0)
    header = ["measure", "model"] + [f"layer {i + 1}" for i in range(depth)] + ["first -> last layer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, path, se_path, fmt in MEASURES:
        for name, analysis in analyses.items():
            values = _get(analysis, path)
            if not values:
                reason = _get(analysis, (path[0], "unavailable")) or {}
                why = next((v for k, v in reason.items() if path[-1] in k or k in path), None) \
                    if isinstance(reason, Mapping) else None
                lines.append(f"| {label} | {name} | " + " | ".join([""] * depth)
                             + f" | not measured{': ' + why if why else ''} |")
                continue
            summary = _get(analysis, se_path) if se_path else None
            se = (summary or {}).get("se") or [None] * len(values)
            cells = [_cell(v, s, fmt) for v, s in zip(values, se)] + [""] * (depth - len(values))
            if summary and _finite(summary.get("change")):
                trend = f"{_cell(summary['change'], summary.get('change_se'), '+' + fmt.lstrip('+'))}: {summary['trend']}"
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
    return "\n".join(lines) + "\n\nGrounding chance (a uniformly random pick): " + "; ".join(notes) + ".\n"


def comparison_figure(analyses: Mapping[str, Mapping], path) -> None:
    """One panel per measure of :data:`MEASURES`, each model a line over its layers with one
    standard error as error bars (grounding: each model's chance dashed in its colour); PNG at ``path``."""
    import numpy as np

    from .plotting import layer_axis, mark_missing, new_figure, save_figure

    fig, axes = new_figure(len(MEASURES))
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
