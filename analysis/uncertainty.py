"""Uncertainty of by-layer quantities, and the words the report may use for their trend.

Every by-layer number the report reads (entropy, affinity, grounding and follow rates) is a ratio of
sums over records, ``R[l] = sum x[l] / sum n[l]``. :class:`ImageUnits` keeps, beside those sums, the
second moments over *images* (a run of consecutive records of one image is one unit), which is
enough for a cluster-robust standard error of each ``R[l]`` and of the change from the first to
the last layer (delta method), streaming and exactly mergeable like every other sum. The report
says "rises" or "falls" only when that change exceeds :data:`TREND_Z` standard errors.
"""
from __future__ import annotations

import numpy as np

from .accumulator import SumTable, ratio, to_list
from geocap.errors import DataError

TREND_Z = 2.0   # a by-layer change is called a rise or a fall when it exceeds TREND_Z standard errors


FOLD_UNITS = 256   # closed units held before their sums go to the table in one vectorised step


class ImageUnits:
    """Per-layer ratios of sums ``R[l] = sum x[l] / sum n[l]`` over records, with their covariance
    ``[L, L]`` estimated from the spread between images (cluster-robust, delta method), so that the
    records of one image, which share its objects and encoder maps, are not taken as independent.

    A unit is a run of consecutive records of one image (a dump stores an image's records together);
    ``add(table, name, image_id, x [L], n [L] or scalar)`` adds a record's sums to the current unit,
    and a record of another image closes it (as does :meth:`close`): its sums and second moments go
    to ``table`` (a :class:`SumTable`, so they merge and round-trip with it) under ``<name>.x``,
    ``.n``, ``.xx``, ``.xn``, ``.nn`` and ``.units``, :data:`FOLD_UNITS` closed units at a time (one
    vectorised sum instead of a dozen small adds per unit). Call ``flush(table)`` before ``state``,
    ``merge`` and ``result``. For m units with linearised values ``z_i[l] = (x_i[l] - R[l] n_i[l]) / N[l]``
    (``N = sum n``), ``cov(R) = m / (m - 1) * sum_i z_i z_i^T``, computed from the moment sums."""

    def __init__(self):
        self.image = None
        self.pending: dict[str, list[np.ndarray]] = {}
        self.closed: dict[str, list[list[np.ndarray]]] = {}     # name -> closed units' [x, n], not yet in a table
        self.units_closed = 0

    def add(self, table: SumTable, name: str, image_id: int, x, n, where: str = "") -> None:
        if image_id != self.image:
            self.close(table)
            self.image = image_id
        x = np.asarray(x, dtype=np.float64)
        if name in self.pending:
            px, pn = self.pending[name]
            if px.shape != x.shape:
                raise DataError(f"{where or 'record'}: {name} has shape {x.shape}, the image's earlier records gave "
                                 f"{px.shape} (records with different layer counts cannot be pooled)")
            px += x                                  # in place: the pending sums are this object's own copies
            pn += n                                  # (n broadcast to x's shape)
        else:
            pn = np.empty_like(x)
            pn[...] = n
            self.pending[name] = [x.copy(), pn]

    def close(self, table: SumTable) -> None:
        """End the current unit; its sums reach ``table`` with the next :data:`FOLD_UNITS` units' (or
        at :meth:`flush`)."""
        if self.pending:
            for name, pair in self.pending.items():
                self.closed.setdefault(name, []).append(pair)
            self.units_closed += 1
            self.pending = {}
        self.image = None
        if self.units_closed >= FOLD_UNITS:
            self._fold(table)

    def flush(self, table: SumTable) -> None:
        """Add every unit, the current one included, to ``table``."""
        self.close(table)
        self._fold(table)

    def _fold(self, table: SumTable) -> None:
        closed, self.closed, self.units_closed = self.closed, {}, 0
        for name, pairs in closed.items():
            if len({x.shape for x, _ in pairs}) == 1:
                self._add_units(table, name, np.stack([x for x, _ in pairs]), np.stack([n for _, n in pairs]))
            else:                                    # units of different layer counts: the table names the clash
                for x, n in pairs:
                    self._add_units(table, name, x[None], n[None])

    @staticmethod
    def _add_units(table: SumTable, name: str, x: np.ndarray, n: np.ndarray) -> None:
        """Add the sums and second moments of the units ``x``, ``n`` ``[m, L]`` (elementwise products:
        no BLAS call, whose threads cost more than these few numbers)."""
        table.add(f"{name}.x", x.sum(axis=0))
        table.add(f"{name}.n", n.sum(axis=0))
        table.add(f"{name}.xx", (x[:, :, None] * x[:, None, :]).sum(axis=0))
        table.add(f"{name}.xn", (x[:, :, None] * n[:, None, :]).sum(axis=0))
        table.add(f"{name}.nn", (n[:, :, None] * n[:, None, :]).sum(axis=0))
        table.add(f"{name}.units", len(x))


def ratio_with_covariance(table: SumTable, name: str) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """``(R [L], cov [L, L] or None, units)`` of the ratio :class:`ImageUnits` accumulated under
    ``name`` (R NaN where ``sum n`` is 0; cov None with fewer than 2 units), or None when nothing was
    added."""
    x, n = table.get(f"{name}.x"), table.get(f"{name}.n")
    if x is None:
        return None
    units = int(table.scalar(f"{name}.units"))
    r = ratio(x, n)
    if units < 2 or not np.isfinite(r).all():
        return r, None, units
    xx, xn, nn = table.get(f"{name}.xx"), table.get(f"{name}.xn"), table.get(f"{name}.nn")
    spread = xx - xn * r[None, :] - xn.T * r[:, None] + nn * np.outer(r, r)      # sum_i (x - R n)(x - R n)^T
    cov = units / (units - 1) * spread / np.outer(n, n)
    return r, cov, units


def standard_errors(cov: np.ndarray | None, layers: int) -> np.ndarray:
    """Per-layer standard errors ``[L]`` from a covariance (NaN without one)."""
    if cov is None:
        return np.full(layers, np.nan)
    return np.sqrt(np.clip(np.diag(cov), 0.0, None))


def trend(values: np.ndarray, cov: np.ndarray | None) -> tuple[str, float | None]:
    """How ``values [L]`` change from the first to the last layer, judged against the standard error
    of that change: ``("rises" | "falls" | "no change beyond its uncertainty", se)``; with one layer
    ``("one layer only", None)``, without a covariance ``("uncertainty unknown", None)``."""
    if len(values) < 2:
        return "one layer only", None
    if cov is None:
        return "uncertainty unknown", None
    se = float(np.sqrt(max(cov[0, 0] + cov[-1, -1] - 2 * cov[0, -1], 0.0)))
    change = float(values[-1] - values[0])
    if abs(change) > TREND_Z * se:
        return ("rises" if change > 0 else "falls"), se
    return "no change beyond its uncertainty", se


def layer_uncertainty(table: SumTable, name: str) -> dict | None:
    """``{"se": [L], "units", "trend", "change", "change_se"}`` of the ratio accumulated under ``name``
    (see :func:`trend`), or None when nothing was added."""
    got = ratio_with_covariance(table, name)
    if got is None:
        return None
    values, cov, units = got
    word, change_se = trend(values, cov)
    return {"se": standard_errors(cov, len(values)), "units": units, "trend": word,
            "change": float(values[-1] - values[0]), "change_se": change_se}


def uncertainty_json(summary: dict | None) -> dict | None:
    """:func:`layer_uncertainty`'s dict for analysis.json (null where not finite)."""
    if summary is None:
        return None
    return {"se": to_list(summary["se"]), "units": summary["units"], "trend": summary["trend"],
            "change": to_list(summary["change"]), "change_se": to_list(summary["change_se"])}


def trend_phrase(values, summary: dict | None, fmt: str = ".3f") -> str:
    """The trend of ``values [L]`` in words, with the numbers behind it: ``rises from 0.512 (± 0.004) in
    layer 1 to 0.601 (± 0.005) in layer 2 (change +0.089 ± 0.006; standard errors over 300 images)``,
    or ``is 0.512 (± 0.004) in layer 1 and 0.515 (± 0.004) in layer 2: no change beyond its
    uncertainty (...)``. Follows a subject ("normalised entropy ...")."""
    def pm(value, se):
        return f"{value:{fmt}}" + ("" if se is None or not np.isfinite(se) else f" (± {se:{fmt}})")

    se = summary["se"] if summary else np.full(len(values), np.nan)
    if len(values) < 2:
        return f"is {pm(values[0], se[0])} (one layer only)"
    first, last = f"{pm(values[0], se[0])} in layer 1", f"{pm(values[-1], se[-1])} in layer {len(values)}"
    word = summary["trend"] if summary else "uncertainty unknown"
    if word in ("rises", "falls"):
        text = f"{word} from {first} to {last}"
    else:
        text = f"is {first} and {last}: {word}"
    if summary and summary["change_se"] is not None:
        text += (f" (change {summary['change']:+{fmt}} ± {summary['change_se']:{fmt}}; standard errors over "
                 f"{summary['units']} images)")
    return text


CI_LEVEL = 0.95   # the per-image measures' intervals: two-sided t intervals over images


class ImageMeans(ImageUnits):
    """Per-layer means over *images* of a per-image value, with a 95 % t interval: the unit is the
    image, each weighing the same, whatever its number of rows, tokens or captions.

    ``add(table, name, image_id, num [L], den [L])`` adds to the current image (a run of consecutive
    records of one image, as in :class:`ImageUnits`); the image's value in layer l is
    ``sum num[l] / sum den[l]`` (e.g. the mean of its rows' correlations: num = their sum, den =
    their count), and a layer whose ``den`` is 0 has no value for that image. Closing an image
    adds, per layer with a value ``v``, ``v``, ``v**2`` and 1 to ``<name>.sum``, ``.sumsq`` and
    ``.images`` of ``table``: exact to merge, and memory does not grow with the images."""

    @staticmethod
    def _add_units(table: SumTable, name: str, num: np.ndarray, den: np.ndarray) -> None:
        has = den > 0
        value = np.divide(num, den, out=np.zeros_like(num), where=has)         # [m, L]
        table.add(f"{name}.sum", value.sum(axis=0))
        table.add(f"{name}.sumsq", (value * value).sum(axis=0))
        table.add(f"{name}.images", has.sum(axis=0).astype(np.float64))


def image_means(table: SumTable, name: str, reason: str) -> tuple[list | None, dict]:
    """The per-layer summaries of what :class:`ImageMeans` accumulated under ``name``: a list over
    layers of ``{"mean", "ci95": [lo, hi], "images"}`` or None for a layer with fewer than two images
    (an interval needs two), and ``{layer key: why}`` for those layers. ``(None, {"": reason})``
    when no image had a value in any layer (``reason`` says why)."""
    from scipy.stats import t as student_t

    total = table.get(f"{name}.sum")
    if total is None or not table.get(f"{name}.images").any():
        return None, {"": reason}
    sumsq, count = table.get(f"{name}.sumsq"), table.get(f"{name}.images")
    out, missing = [], {}
    for layer, (s, ss, n) in enumerate(zip(total, sumsq, count)):
        n = int(n)
        if n < 2:
            out.append(None)
            missing[f"layer{layer + 1}"] = reason if n == 0 else "only 1 image with a value (an interval needs 2)"
            continue
        mean = s / n
        var = max((ss - n * mean * mean) / (n - 1), 0.0)
        half = float(student_t.ppf(0.5 + CI_LEVEL / 2, n - 1)) * np.sqrt(var / n)
        out.append({"mean": float(mean), "ci95": [float(mean - half), float(mean + half)], "images": n})
    return out, missing


def interval_verdict(entry: dict | None) -> str:
    """``"positive"`` / ``"negative"`` when the 95 % interval excludes 0 on that side,
    ``"inconclusive"`` when it holds 0, ``"not computed"`` without an entry."""
    if entry is None:
        return "not computed"
    lo, hi = entry["ci95"]
    if lo > 0:
        return "positive"
    if hi < 0:
        return "negative"
    return "inconclusive"


def interval_text(entry: dict | None, fmt: str = "+.3f") -> str:
    """``+0.123 [+0.100, +0.146] (300 images)``, or ``n/a``."""
    if entry is None:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{entry['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}] ({entry['images']} images)"


def layer_verdicts(entries: list | None, words: dict | None = None) -> str:
    """The per-layer verdicts of :func:`interval_verdict` grouped in words: ``negative in layers 1, 2;
    inconclusive in layer 3``. ``words`` renames verdicts (e.g. ``{"negative": "falls with distance"}``)."""
    if not entries:
        return "not computed"
    words = words or {}
    groups: dict[str, list[int]] = {}
    for layer, entry in enumerate(entries):
        groups.setdefault(interval_verdict(entry), []).append(layer + 1)
    order = ("positive", "negative", "inconclusive", "not computed")
    parts = []
    for verdict in sorted(groups, key=order.index):
        layers = groups[verdict]
        parts.append(f"{words.get(verdict, verdict)} in layer{'s' if len(layers) > 1 else ''} "
                     + ", ".join(map(str, layers)))
    return "; ".join(parts)


def first_measured(per_image: dict, names) -> tuple[str | None, list | None]:
    """``(name, entries)`` of the first of ``names`` that ``per_image`` holds entries for (the
    controlled measure a verdict rests on, then its fallbacks), or ``(None, None)``."""
    for name in names:
        if per_image.get(name):
            return name, per_image[name]
    return None, None


def layers_text(entries: list, fmt: str = "+.3f") -> str:
    """``layer 1: +0.12 [+0.10, +0.14] (300 images); layer 2: ...`` (:func:`interval_text` per layer)."""
    return "; ".join(f"layer {l + 1}: {interval_text(e, fmt)}" for l, e in enumerate(entries))
