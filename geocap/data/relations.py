"""The spatial relations between boxes: their names, thresholds and truth, in one place.

The synthetic captions are written from these definitions (``geocap.data.synth``) and the
relation-word metric judges generated captions by them (``geocap.metrics.relations``), so the two
cannot disagree. Boxes are numpy arrays; nothing here depends on the synthetic world.

For boxes A = (ax1, ay1, ax2, ay2) and B (normalised, y pointing down), with widths
aw = ax2 - ax1, heights ah = ay2 - ay1, the overlap of the x intervals
ox = min(ax2, bx2) - max(ax1, bx1) (negative: a gap) and oy likewise, "A <rel> B" is TRUE
exactly when:

- ``left of``:  ax2 <= bx1 and oy > 0           (A ends before B begins; they share some height)
- ``right of``: bx2 <= ax1 and oy > 0
- ``above``:    ay2 <= by1 and ox > 0           (A ends above B's top; they share some width)
- ``below``:    by2 <= ay1 and ox > 0
- ``on``:       by1 < ay2 <= by1 + 0.3 bh, ay1 < by1, bx1 <= ax1 and ax2 <= bx2
                (A's bottom edge lies in the top 30% of B, A sticks out above B's top, and A
                is within B's width)
- ``inside``:   bx1 <= ax1, by1 <= ay1, ax2 <= bx2, ay2 <= by2 and aw ah <= 0.5 bw bh
- ``next to``:  0 <= -ox <= 0.5 min(aw, bw) and oy >= 0.5 min(ah, bh)
                (side by side, the gap at most half the narrower width, sharing at least half
                the lower height)

and never for A = B. "on" and "above", "on" and "inside" exclude each other; "next to" implies
"left of" or "right of". Between two groups of objects a relation holds when it holds for every
(object of the first, object of the second).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RELATIONS = ("left of", "right of", "above", "below", "on", "inside", "next to")
ON_DEPTH = 0.3             # "on": A's bottom within the top 30% of B
INSIDE_AREA = 0.5          # "inside": A's area at most half of B's
NEXT_TO_GAP = 0.5          # "next to": gap <= 0.5 x the narrower width
NEXT_TO_OVERLAP = 0.5      # "next to": shared height >= 0.5 x the lower height


def relation_thresholds() -> dict:
    """The thresholds :func:`relation_matrix` uses now, by the names ``ground_truth.json`` records
    them under (``parameters.relation_thresholds``)."""
    return {"on_depth": ON_DEPTH, "inside_area": INSIDE_AREA, "next_to_gap": NEXT_TO_GAP,
            "next_to_overlap": NEXT_TO_OVERLAP}


def relation_matrix(boxes: np.ndarray) -> np.ndarray:
    """bool ``[..., 7, N, N]``: entry ``[..., r, i, j]`` is whether "object i RELATIONS[r]
    object j" for boxes ``[..., N, 4]``; the diagonal is False. Computed in float64 from the
    given values (pass the float32 boxes as stored)."""
    b = np.asarray(boxes, dtype=np.float64)
    ax1, ay1, ax2, ay2 = (b[..., :, None, k] for k in range(4))     # object i: [..., N, 1]
    bx1, by1, bx2, by2 = (b[..., None, :, k] for k in range(4))     # object j: [..., 1, N]
    aw, ah, bw, bh = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    ox = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
    oy = np.minimum(ay2, by2) - np.maximum(ay1, by1)
    left = (ax2 <= bx1) & (oy > 0)
    above = (ay2 <= by1) & (ox > 0)
    within_x = (bx1 <= ax1) & (ax2 <= bx2)
    on = (by1 < ay2) & (ay2 <= by1 + ON_DEPTH * bh) & (ay1 < by1) & within_x
    inside = within_x & (by1 <= ay1) & (ay2 <= by2) & (aw * ah <= INSIDE_AREA * bw * bh)
    next_to = (-ox >= 0) & (-ox <= NEXT_TO_GAP * np.minimum(aw, bw)) & (oy >= NEXT_TO_OVERLAP * np.minimum(ah, bh))
    right, below = np.swapaxes(left, -1, -2), np.swapaxes(above, -1, -2)   # "B left of A" = "A right of B"
    out = np.stack([left, right, above, below, on, inside, next_to], axis=-3)
    n = b.shape[-2]
    out[..., np.arange(n), np.arange(n)] = False
    return out


def group_relations(relations: np.ndarray, members: Sequence[tuple]) -> np.ndarray:
    """bool ``[7, G, G]``: group g <rel> group h when it holds for every (object of g, object
    of h); ``relations`` is one image's ``[7, N, N]``, ``members`` the groups' object indices
    (disjoint); the diagonal is False."""
    m = np.zeros((len(members), relations.shape[-1]))
    for g, objs in enumerate(members):
        m[g, list(objs)] = 1.0
    failures = np.einsum("gn,rnm,hm->rgh", m, (~relations).astype(np.float64), m)
    out = failures == 0
    out[:, np.arange(len(members)), np.arange(len(members))] = False
    return out
