"""A bounded, seeded, exactly mergeable sample of object pairs: bottom-k sampling by hash.

Every pair gets a 64-bit key, a hash of (seed, image id, query i, key j) (splitmix64 finaliser, so
keys behave as independent uniform draws). The sample holds the ``capacity`` distinct keys that are
smallest among all seen: a uniform random sample without replacement of the distinct pairs, which
depends only on the set of pairs seen, not on their order or on how the records were split, so
``merge`` (keep the smallest keys of the union) gives exactly the sample a single pass would.

Keys name the image, not the record: encoder attention depends on the image alone, and a dump
holds every record of an image with the same encoder maps (one per reference caption), so an
image's pairs enter the sample once however many records it has (the first offered is kept).
Stored per pair: its key, an x value (distance or similarity) and one y value per layer
(attention weight), so ``Spearman(x, y[l])`` can be computed on the sample at the end.
"""
from __future__ import annotations

import numpy as np

from .accumulator import STATE_SEPARATOR
from geocap.errors import DataError, UsageError

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def pair_keys(seed: int, image_id: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Keys ``uint64 [P]`` of the pairs ``(i[p], j[p])`` of objects of image ``image_id``: the
    values are mixed in one after another (``h = mix(h ^ value)``), so no two (image, i, j) share a
    structure that makes their keys collide (xoring separately mixed parts would: it is symmetric)."""
    with np.errstate(over="ignore"):
        h = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        h = _mix(h ^ np.array([image_id & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        h = _mix(h ^ np.asarray(i, dtype=np.uint64))
        return _mix(h ^ np.asarray(j, dtype=np.uint64))


class PairReservoir:
    """Every offered distinct pair whose key is at most ``bound``, at most ``capacity`` of them (the
    smallest keys), sorted by key; x ``[M]`` float64, y ``[L, M]`` float32; ``seen``: pairs offered
    (an image's pairs once per record).

    ``bound`` (None: no bound, every pair offered is held) makes the sample exactly mergeable even
    when a part was stored cut down to fewer pairs (:meth:`state` with ``stored``): a part holds
    *every* pair it saw with a key up to its bound, so the union of parts holds every pair up to the
    smallest of their bounds, and :meth:`merge` keeps exactly those (then the ``capacity``
    smallest). The result is the single pass's sample whenever no part's cut reached below the
    single pass's own bound (its ``capacity``-th key); otherwise it is still a uniform sample of the
    distinct pairs (all of those below a key), only smaller, and ``len`` says how large."""

    def __init__(self, capacity: int):
        if capacity < 3:
            raise UsageError(f"reservoir capacity must be >= 3 pairs, got {capacity}")
        self.capacity = int(capacity)
        self.keys = np.zeros(0, dtype=np.uint64)
        self.x = np.zeros(0, dtype=np.float64)
        self.y: np.ndarray | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_size = 0
        self.bound: np.uint64 | None = None         # largest key held once cut: larger keys never enter
        self.seen = 0                               # pairs offered, for the report

    def add(self, keys: np.ndarray, x: np.ndarray, y: np.ndarray, where: str = "") -> None:
        """Offer pairs: ``keys [P]`` uint64, ``x [P]``, ``y [L, P]``."""
        self.seen += len(keys)
        layers = self.y.shape[0] if self.y is not None else (self._pending[0][2].shape[0] if self._pending else None)
        if layers is not None and y.shape[0] != layers:
            raise DataError(f"{where or 'merge'}: {y.shape[0]} layers, earlier records had {layers}")
        if self.bound is not None:
            keep = keys <= self.bound
            keys, x, y = keys[keep], x[keep], y[:, keep]
        if len(keys) == 0:
            return
        self._pending.append((keys, np.asarray(x, np.float64), np.asarray(y, np.float32)))
        self._pending_size += len(keys)
        if self._pending_size >= self.capacity:
            self.compact()

    def compact(self) -> None:
        """Fold the pending pairs in, keep the distinct keys up to ``bound``, at most the smallest
        ``capacity``, sorted by key."""
        if not self._pending:
            return
        parts_y = ([self.y] if self.y is not None else []) + [p[2] for p in self._pending]
        keys = np.concatenate([self.keys] + [p[0] for p in self._pending])
        x = np.concatenate([self.x] + [p[1] for p in self._pending])
        y = np.concatenate(parts_y, axis=1)
        self._pending, self._pending_size = [], 0
        keys, first = np.unique(keys, return_index=True)       # sorted, distinct, first occurrence
        if self.bound is not None:
            first = first[keys <= self.bound]
        first = first[: self.capacity]
        self.keys, self.x, self.y = keys[: len(first)], x[first], y[:, first]
        if len(self.keys) == self.capacity:
            self._cut(self.keys[-1])

    def _cut(self, key: np.uint64) -> None:
        self.bound = key if self.bound is None else min(self.bound, key)

    def merge(self, other: "PairReservoir") -> None:
        other.compact()
        self.compact()
        seen = self.seen + other.seen
        if other.bound is not None:                 # the union is complete up to the smaller bound only
            self._cut(other.bound)
            keep = self.keys <= self.bound
            self.keys, self.x = self.keys[keep], self.x[keep]
            if self.y is not None:
                self.y = self.y[:, keep]
        if other.y is not None:
            self.add(other.keys, other.x, other.y)
        self.compact()
        self.seen = seen

    def state(self, prefix: str, stored: int | None = None) -> dict[str, np.ndarray]:
        """The sample as arrays; with ``stored``, cut to its ``stored`` smallest keys (``bound``
        lowered to match), so a part stores less and still merges exactly (see the class doc)."""
        self.compact()
        keys, x, y, bound = self.keys, self.x, self.y, self.bound
        if stored is not None and len(keys) > stored:
            if stored < 3:
                raise UsageError(f"a stored sample must keep >= 3 pairs, got {stored}")
            keys, x, y = keys[:stored], x[:stored], y[:, :stored]
            bound = keys[-1] if bound is None else min(bound, keys[-1])
        sep = STATE_SEPARATOR
        out = {f"{prefix}{sep}keys": keys.copy(), f"{prefix}{sep}x": x.copy(),
               f"{prefix}{sep}seen": np.asarray(self.seen, dtype=np.int64),
               f"{prefix}{sep}bound": np.asarray([] if bound is None else [bound], dtype=np.uint64)}
        if y is not None:
            out[f"{prefix}{sep}y"] = y.copy()
        return out

    @classmethod
    def from_state(cls, state: dict, prefix: str, capacity: int) -> "PairReservoir":
        sep = STATE_SEPARATOR
        if f"{prefix}{sep}bound" not in state:
            raise DataError(f"{prefix}: the stored sample has no bound (written by an older geocap)")
        res = cls(capacity)
        res.keys = np.array(state[f"{prefix}{sep}keys"], dtype=np.uint64)
        res.x = np.array(state[f"{prefix}{sep}x"], dtype=np.float64)
        res.seen = int(np.asarray(state[f"{prefix}{sep}seen"]))
        if f"{prefix}{sep}y" in state:
            res.y = np.array(state[f"{prefix}{sep}y"], dtype=np.float32)
        if len(res.keys) > capacity:
            raise DataError(f"{prefix}: the stored sample holds {len(res.keys)} pairs, more than its "
                             f"capacity {capacity}")
        bound = np.asarray(state[f"{prefix}{sep}bound"], dtype=np.uint64).ravel()
        res.bound = bound[0] if len(bound) else None
        if len(res.keys) == capacity:
            res._cut(res.keys[-1])
        return res

    def __len__(self) -> int:
        self.compact()
        return len(self.keys)
