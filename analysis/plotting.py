"""One PNG per analysis result (matplotlib's Agg canvas directly: no pyplot, no global backend).

Every figure is written atomically; where a panel's numbers could not be computed it says so
(with the reason) instead of plotting nothing.
"""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from geocap.data.atomic import atomic_output

DPI = 110
# one colour per attention kind, in every figure here and on every page of the viewer
# (geocap.view reads this constant): matplotlib's first three default colours
ATTENTION_COLOURS = {"encoder_self": "#1f77b4", "decoder_self": "#ff7f0e", "cross": "#2ca02c"}


def new_figure(panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.0 * panels, 3.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.15, wspace=0.08)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def layer_axis(ax) -> None:
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig: Figure, path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def mark_missing(ax, title: str, reason: str | None) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not computed:\n" + (reason or "no data"), ha="center", va="center", wrap=True,
            fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def _layers(values) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def _masked(values) -> np.ndarray:
    return np.ma.masked_invalid(np.asarray(values, dtype=float))


def interval_series(entries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, low, high)`` ``[L]`` of a per-image measure's entries (``{mean, ci95, images}`` or
    None per layer; NaN where None)."""
    rows = [(e["mean"], *e["ci95"]) if e else (np.nan,) * 3 for e in entries]
    mean, low, high = (np.asarray(col, dtype=float) for col in zip(*rows))
    return mean, low, high


def plot_intervals(ax, series: dict, *, title: str, ylabel: str, naive: dict | None = None,
                   limits: tuple[float, float] = (-1.0, 1.0), fmt: str = "+.2f") -> None:
    """Per-layer controlled measures with their 95 % intervals over images (shaded, clipped to the
    measure's ``limits``), ``series``: ``{label: entries}`` (the first solid, the rest dashed), and the
    naive measures beside them (``naive``: ``{label: [L] values}``, dotted, no interval); 0 drawn."""
    drawn = []
    for k, (label, entries) in enumerate(series.items()):
        if not entries:
            continue
        mean, low, high = interval_series(entries)
        layers = _layers(mean)
        line, = ax.plot(layers, _masked(mean), marker="o", linestyle="-" if k == 0 else "--", label=label)
        ax.fill_between(layers, np.clip(low, *limits), np.clip(high, *limits), color=line.get_color(), alpha=0.2,
                        linewidth=0)
        drawn.append(mean)
    for label, values in (naive or {}).items():
        if values is None:
            continue
        values = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.plot(_layers(values), _masked(values), marker="x", linestyle=":", color="0.35", label=label)
        drawn.append(values)
    if not drawn:
        mark_missing(ax, title, "no image had a defined value")
        return
    ax.axhline(0.0, color="gray", linewidth=0.8)
    layer_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def plot_entropy(result, path) -> None:
    """Mean normalised entropy per layer, one line per attention kind (heads as a shaded range)."""
    fig, (ax,) = new_figure(1)
    drawn = False
    for kind in ("encoder_self", "decoder_self", "cross"):
        per_head = result.per_head.get(kind)
        if per_head is None:
            continue
        layers = _layers(per_head)
        colour = ATTENTION_COLOURS[kind]
        ax.plot(layers, per_head.mean(axis=1), marker="o", label=kind, color=colour)
        ax.fill_between(layers, per_head.min(axis=1), per_head.max(axis=1), alpha=0.15, color=colour)
        drawn = True
    if not drawn:
        mark_missing(ax, "attention entropy", "; ".join(f"{k}: {v}" for k, v in result.unavailable.items()))
    else:
        layer_axis(ax)
        ax.set_ylabel("normalised entropy (1 = uniform)")
        ax.set_ylim(0, 1.05)
        ax.set_title("attention entropy per layer (band: range over heads)")
        ax.legend()
    save_figure(fig, path)


def plot_thematic(result, path) -> None:
    """Affinity heatmap, layer x head (1 = chance), and the within/across cluster feature cosines."""
    fig, (controlled, heat, bars) = new_figure(3)
    plot_intervals(controlled, {"same cluster, given feature similarity": result.per_image.get(
        "cluster_given_similarity"), "same cluster (no control)": result.per_image.get("cluster")},
        title="controlled: attention within the query's cluster", ylabel="within-row correlation (95 % CI)")
    if result.affinity is None:
        mark_missing(heat, "within-cluster affinity", result.unavailable.get("affinity"))
    else:
        aff = _masked(result.affinity)
        top = max(2.0, float(aff.max()) if aff.count() else 2.0)
        image = heat.imshow(aff, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=top), aspect="auto",
                            interpolation="nearest")
        fig.colorbar(image, ax=heat, label="affinity (1 = chance)", pad=0.02)
        heat.set_xlabel("head")
        heat.set_ylabel("layer")
        heat.set_xticks(range(aff.shape[1]), [str(h + 1) for h in range(aff.shape[1])])
        heat.set_yticks(range(aff.shape[0]), [str(l + 1) for l in range(aff.shape[0])])
        heat.set_title("naive: affinity, layer x head")
    if result.same_cluster_cosine is None or result.diff_cluster_cosine is None:
        mark_missing(bars, "feature cosine", result.unavailable.get("same_cluster_cosine")
                 or result.unavailable.get("diff_cluster_cosine"))
    else:
        bars.bar(["same cluster", "different clusters"], [result.same_cluster_cosine, result.diff_cluster_cosine],
                 color=["tab:red", "tab:blue"])
        bars.set_ylabel("mean cosine similarity")
        bars.set_title("object features (seed: 0.50 vs 0.31)")
    save_figure(fig, path)


def plot_proximity(result, path) -> None:
    """Mean attention weight per distance bin and per similarity bin, one curve per layer, over the
    pairs behind each bin (grey bars, right axis); bins under ``MIN_BIN_PAIRS`` pairs are left out."""
    from .proximity import MIN_BIN_PAIRS

    fig, (controlled, *axes) = new_figure(3)
    plot_intervals(controlled, {"distance, given feature similarity": result.per_image.get(
        "distance_given_similarity"), "distance (no control)": result.per_image.get("distance")},
        naive={"naive: Spearman over pooled pairs": result.spearman_distance},
        title="controlled: attention vs distance", ylabel="within-row correlation (95 % CI)")
    for ax, measure, label in zip(axes, ("distance", "similarity"),
                                  ("normalised box-centre distance", "feature cosine similarity")):
        curve = result.shown_curve(measure)
        if curve is None:
            mark_missing(ax, f"attention vs {measure}", result.unavailable.get(f"spearman_{measure}"))
            continue
        edges = result.edges(measure)
        centres = (edges[:-1] + edges[1:]) / 2
        counts = ax.twinx()
        counts.bar(centres, result.counts[measure], width=np.diff(edges) * 0.9, color="0.85", zorder=0)
        counts.axhline(MIN_BIN_PAIRS, color="0.5", linestyle=":", linewidth=1)
        counts.set_yscale("symlog", linthresh=max(MIN_BIN_PAIRS, 1))
        counts.set_ylabel(f"object pairs per bin (dotted: {MIN_BIN_PAIRS}, fewer are left out)", fontsize=8)
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        rhos = getattr(result, f"spearman_{measure}") or [None] * len(curve)
        for layer, (values, rho) in enumerate(zip(curve, rhos)):
            tag = f"layer {layer + 1}" + ("" if rho is None else f" (rho {rho:+.2f})")
            ax.plot(centres, _masked(values), marker=".", label=tag)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel(label)
        ax.set_ylabel("mean attention weight (head mean)")
        ax.set_title(f"attention vs {measure} ({result.images} images)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def rate_limits(*series, floor: float = 0.05) -> tuple[float, float]:
    """y-limits for rates in [0, 1] that show their differences: the data's range (NaN ignored)
    widened by a tenth on each side, at least ``floor`` wide, clipped to [0, 1]."""
    values = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in series])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    pad = max((high - low) * 0.1, (floor - (high - low)) / 2, 0.0)
    return max(0.0, low - pad), min(1.0, high + pad)


def _spread(values, summary) -> list:
    """``values`` and the ends of their error bars, for :func:`rate_limits`."""
    if summary is None:
        return [values]
    se = np.asarray(summary["se"], dtype=float)
    return [values, np.asarray(values) - se, np.asarray(values) + se]


def _rate(ax, values, summary, **style) -> None:
    """A per-layer rate with its standard errors (from the analysis' uncertainty) as error bars."""
    se = None if summary is None else _masked(summary["se"])
    ax.errorbar(_layers(values), values, yerr=se, capsize=3, **style)


def plot_grounding(result, path) -> None:
    """Grounding accuracy per layer vs chance (head-mean map and the layer's best head), and the
    hypothetical follow rate against its same-step baseline and the stay rate; error bars: one
    standard error over images; the y range is zoomed onto the values."""
    fig, (effect, acc, follow) = new_figure(3)
    plot_intervals(effect, {"referent effect: own - wrong referent": result.referent_effect},
                   naive={"naive: accuracy - chance": None if result.accuracy is None
                          else list(np.asarray(result.accuracy) - result.chance)},
                   title=f"controlled: the noun's own object ({result.effect_tokens} nouns)",
                   ylabel="difference in hit rate (95 % CI)")
    if result.accuracy is None:
        mark_missing(acc, "grounding accuracy", result.unavailable.get("accuracy"))
    else:
        best_head = np.max(result.accuracy_per_head, axis=1)
        _rate(acc, result.accuracy, result.uncertainty.get("accuracy"), marker="o", label="head-mean map")
        acc.plot(_layers(best_head), best_head, marker="^", linestyle=":", label="best head of the layer")
        acc.axhline(result.chance, color="gray", linestyle="--", label="chance")
        acc.set_ylim(*rate_limits(*_spread(result.accuracy, result.uncertainty.get("accuracy")), best_head,
                                  [result.chance]))
        layer_axis(acc)
        acc.set_ylabel("referent is most attended")
        acc.set_title(f"noun grounding in cross-attention ({result.tokens} nouns)")
        acc.legend(fontsize=8)
    if result.follow_rate is None:
        mark_missing(follow, "hypothetical captions", result.unavailable.get("hypothetical_follow_rate"))
    else:
        u = result.uncertainty
        _rate(follow, result.follow_rate, u.get("hypothetical_follow_rate"), marker="o",
              label="follows the new word (step after it)")
        _rate(follow, result.follow_rate_same_step, u.get("hypothetical_follow_rate_same_step"), marker="v",
              linestyle="--", label="baseline: at the word's own step")
        _rate(follow, result.source_rate, u.get("hypothetical_source_rate"), marker="s",
              label="stays on the original object")
        follow.axhline(result.hypothetical_chance, color="gray", linestyle="--", label="chance")
        rates = {"hypothetical_follow_rate": result.follow_rate, "hypothetical_source_rate": result.source_rate,
                 "hypothetical_follow_rate_same_step": result.follow_rate_same_step}
        spread = [part for key, values in rates.items() for part in _spread(values, u.get(key))]
        follow.set_ylim(*rate_limits(*spread, [result.hypothetical_chance]))
        layer_axis(follow)
        follow.set_ylabel("share of swapped nouns")
        follow.set_title(f"hypothetical captions ({result.hypothetical_tokens} swaps)")
        follow.legend(fontsize=8)
    save_figure(fig, path)
