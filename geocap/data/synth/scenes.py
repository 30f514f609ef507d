"""Scenes: which objects an image holds and where their boxes are.

An image draws a size (640x480 and other COCO-like sizes, portrait and landscape), a theme (a
cluster) and a number of objects, 3 to 12. Objects are drawn one by one, from the theme's
categories with probability 0.8, else from another cluster (distractors); a whole (car, bus,
laptop, boat) brings parts (wheels, windows, screen, keyboard, sail) at fixed places inside it,
jittered. Then boxes are placed, the objects that can carry others first: an object that rests
on something (a cup on a table, a pillow on a couch, a bird on a car) is put on one when the
scene has it, a ground object often beside another one, anything else at random in its zone.
Finally the objects are shuffled, so that parts do not follow their wholes.

Every box lies within [MARGIN, 1 - MARGIN] with width and height >= MIN_SIZE.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .world import (BESIDE_P, CATEGORIES, CLUSTER_OF, CLUSTERS, IMAGE_SIZE_WEIGHTS, IMAGE_SIZES, MARGIN,
                    MAX_HEIGHT, MAX_OBJECTS, MIN_OBJECTS, MIN_SIZE, ON_P, PART_JITTER, PART_SLOTS, SUPPORT_IDS,
                    THEME_CATEGORIES, THEME_P, Category)

_SIZE_CUMULATIVE = tuple(np.cumsum(IMAGE_SIZE_WEIGHTS) / sum(IMAGE_SIZE_WEIGHTS))
_CARRIERS = frozenset().union(*SUPPORT_IDS)          # categories something may rest on


class Draws:
    """Uniform numbers in [0, 1) from a numpy Generator, fetched in blocks (a scalar Generator
    call costs about a microsecond) and consumed in order: deterministic for the seed."""

    def __init__(self, rng: np.random.Generator, block: int = 8192):
        self._rng, self._block = rng, block
        self._buf, self._pos = [], 0

    def u(self) -> float:
        if self._pos == len(self._buf):
            self._buf, self._pos = self._rng.random(self._block).tolist(), 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.u()

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        return min(int(self.u() * n), n - 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def cumulative(self, cum: Sequence[float]) -> int:
        """An index drawn with the probabilities whose running sums are ``cum``."""
        return min(bisect.bisect_right(cum, self.u() * cum[-1]), len(cum) - 1)

    def shuffled(self, items) -> list:
        items = list(items)
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
        return items


@dataclass
class Scene:
    """One image's objects. categories int64 ``[N]`` (ids into ``CATEGORIES``); boxes float32
    ``[N, 4]`` normalised (x1, y1, x2, y2); part_of int64 ``[N]``: the index of the object's
    whole, -1 for none; theme: the cluster id the scene was drawn around."""
    width: int
    height: int
    theme: int
    categories: np.ndarray
    boxes: np.ndarray
    part_of: np.ndarray

    @property
    def clusters(self) -> np.ndarray:
        """int64 ``[N]``: each object's cluster id."""
        return CLUSTER_OF[self.categories]


def _into_image(lo: float, hi: float) -> tuple:
    """Shift the interval [lo, hi] (no longer than 1 - 2 MARGIN) into [MARGIN, 1 - MARGIN]."""
    if lo < MARGIN:
        lo, hi = MARGIN, hi + (MARGIN - lo)
    if hi > 1 - MARGIN:
        lo, hi = lo - (hi - (1 - MARGIN)), 1 - MARGIN
    return lo, hi


def _at_least_min(lo: float, hi: float, bound_lo: float, bound_hi: float) -> tuple:
    """[lo, hi] widened to MIN_SIZE about its centre when narrower, within [bound_lo, bound_hi]."""
    if hi - lo >= MIN_SIZE:
        return lo, hi
    centre = min(max((lo + hi) / 2, bound_lo + MIN_SIZE / 2), bound_hi - MIN_SIZE / 2)
    return centre - MIN_SIZE / 2, centre + MIN_SIZE / 2


def _object_size(draws: Draws, cat: Category, ratio: float) -> tuple:
    """(w, h) normalised for a new object; ``ratio`` = image width / height."""
    w = draws.uniform(*cat.width)
    h = w * cat.aspect * ratio
    if h > MAX_HEIGHT:
        w, h = w * MAX_HEIGHT / h, MAX_HEIGHT
    return max(w, MIN_SIZE), max(h, MIN_SIZE)


def _place_free(draws: Draws, w: float, h: float, zone: str) -> tuple:
    x1 = draws.uniform(MARGIN, 1 - MARGIN - w)
    if zone == "ground":
        y2 = draws.uniform(0.55, 1 - MARGIN)
        y1 = y2 - h
    elif zone == "high":
        y1 = draws.uniform(MARGIN, 0.3)
        y2 = y1 + h
    else:
        cy = draws.uniform(0.3, 0.65)
        y1, y2 = cy - h / 2, cy + h / 2
    y1, y2 = _into_image(y1, y2)
    return (x1, y1, x1 + w, y2)


def _place_on(draws: Draws, w: float, h: float, support: tuple, cat: Category, ratio: float) -> Optional[tuple]:
    """A box resting on ``support`` (the "on" relation by construction), or None if it does not fit."""
    sx1, sy1, sx2, sy2 = support
    sw, sh = sx2 - sx1, sy2 - sy1
    if w > 0.8 * sw:
        w = 0.8 * sw
        h = max(w * cat.aspect * ratio, MIN_SIZE)
    sunk = draws.uniform(0.05, 0.25) * min(h, sh)       # A's bottom this far below B's top
    y2 = sy1 + sunk
    y1 = y2 - h
    if y1 < MARGIN or w < MIN_SIZE:
        return None
    x1 = sx1 + draws.u() * (sw - w)
    return (x1, y1, min(x1 + w, sx2), y2)


def _place_beside(draws: Draws, w: float, h: float, other: tuple) -> Optional[tuple]:
    """A box on the ground line of ``other``, left or right of it with a small gap, or None."""
    ox1, oy1, ox2, oy2 = other
    gap = draws.u() * 0.4 * min(w, ox2 - ox1)
    y2 = oy2 + draws.uniform(-0.05, 0.05) * (oy2 - oy1)
    y1, y2 = _into_image(y2 - h, y2)
    right = draws.u() < 0.5
    for side in (right, not right):
        x1 = ox2 + gap if side else ox1 - gap - w
        if x1 >= MARGIN and x1 + w <= 1 - MARGIN:
            return (x1, y1, x1 + w, y2)
    return None


def _place_part(draws: Draws, whole: tuple, frac: tuple) -> tuple:
    """A part's box at the jittered fractions ``frac`` of ``whole``, clipped into the whole."""
    wx1, wy1, wx2, wy2 = whole
    f = [min(max(v + draws.uniform(-PART_JITTER, PART_JITTER), 0.0), 1.0) for v in frac]
    x1, x2 = _at_least_min(wx1 + f[0] * (wx2 - wx1), wx1 + f[2] * (wx2 - wx1), wx1, wx2)
    y1, y2 = _at_least_min(wy1 + f[1] * (wy2 - wy1), wy1 + f[3] * (wy2 - wy1), wy1, wy2)
    return (max(x1, wx1), max(y1, wy1), min(x2, wx2), min(y2, wy2))


def _draw_category(draws: Draws, theme: int) -> int:
    cluster = theme
    if draws.u() >= THEME_P:
        cluster = (theme + 1 + draws.below(len(CLUSTERS) - 1)) % len(CLUSTERS)
    return draws.choice(THEME_CATEGORIES[cluster])


def sample_scene(draws: Draws) -> Scene:
    """One random scene (see the module docstring), consuming ``draws``."""
    width, height = IMAGE_SIZES[draws.cumulative(_SIZE_CUMULATIVE)]
    ratio = width / height
    theme = draws.below(len(CLUSTERS))
    n_objects = MIN_OBJECTS + draws.below(MAX_OBJECTS - MIN_OBJECTS + 1)

    plan, count = [], 0                          # (category, the slots of the parts it shows)
    while count < n_objects:
        cat = _draw_category(draws, theme)
        slots = [s for s in PART_SLOTS.get(cat, ()) if draws.u() < s[1]][:n_objects - count - 1]
        plan.append((cat, slots))
        count += 1 + len(slots)
    plan.sort(key=lambda entry: entry[0] not in _CARRIERS)   # carriers first, else in drawing order

    cats, boxes, part_of = [], [], []
    for cat, slots in plan:
        spec = CATEGORIES[cat]
        w, h = _object_size(draws, spec, ratio)
        box = None
        supports = [i for i, k in enumerate(cats) if k in SUPPORT_IDS[cat]]
        if supports and draws.u() < ON_P:
            box = _place_on(draws, w, h, boxes[draws.choice(supports)], spec, ratio)
        if box is None and spec.zone == "ground" and draws.u() < BESIDE_P:
            ground = [i for i, k in enumerate(cats) if part_of[i] < 0 and CATEGORIES[k].zone == "ground"]
            if ground:
                box = _place_beside(draws, w, h, boxes[draws.choice(ground)])
        if box is None:
            box = _place_free(draws, w, h, spec.zone)
        whole = len(cats)
        cats.append(cat), boxes.append(box), part_of.append(-1)
        for part, _, frac in slots:
            cats.append(part), boxes.append(_place_part(draws, box, frac)), part_of.append(whole)

    order = draws.shuffled(range(len(cats)))     # new position -> old index
    new_index = {old: new for new, old in enumerate(order)}
    return Scene(width=width, height=height, theme=theme,
                 categories=np.array([cats[i] for i in order], dtype=np.int64),
                 boxes=np.array([boxes[i] for i in order], dtype=np.float32),
                 part_of=np.array([new_index[part_of[i]] if part_of[i] >= 0 else -1 for i in order],
                                  dtype=np.int64))
