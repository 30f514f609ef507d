"""The streaming, mergeable accumulator every analysis is built on, and its small helpers.

An analysis is a fold over records: ``update(record)`` adds one record, ``update_image(records)``
one image's records at once (the same sums, up to float64 summation order: what sums over the
records' rows is computed once for their rows joined; what a dump's writer and ``geocap analyze``
call, ~45 % cheaper per record), ``merge(other)`` adds
another accumulator's records (from another shard or rank), ``state()`` exports everything as a
flat ``dict[str, np.ndarray]`` (storable as HDF5 datasets: plain names, numeric arrays, 0-d for
scalars), ``from_state(state)`` rebuilds the accumulator, and ``result()`` turns the sums into the
analysis' numbers. Memory never grows with the number of records (each analysis documents its
bounds).

Most statistics are ratios of sums (mean = sum / count), so they live in a :class:`SumTable`:
named float64 arrays whose shape (usually ``[L, H]`` or ``[L]``) is fixed by the first record
that contributes and only ever grows by addition, which makes ``merge`` exact (up to float64
summation order) and independent of how the records were split.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np

from geocap.data.attention_record import Record, regular_objects

from .rows import AttentionRows
from geocap.errors import DataError

STATE_SEPARATOR = "."


def describe(record: Record) -> str:
    """``image 12 (caption 3, reference)``: how errors name a record."""
    return f"image {record.image_id} (caption {record.caption_id}, {record.kind})"


def as_map(record: Record, name: str) -> np.ndarray | None:
    """The record's attention map ``name`` as float64 (stored maps are float16), or None; converted
    once per record inside :func:`shared_per_record` (never modify it).

    Raises ValueError naming the record when the map holds NaN, infinite or negative weights."""
    if getattr(record, name) is None:
        return None

    def compute():
        value = np.asarray(getattr(record, name), dtype=np.float64)
        if not valid_weights(value):
            raise DataError(f"record of {describe(record)}: {name} holds NaN, infinite or negative attention "
                             f"weights")
        return value

    return shared(record, f"map.{name}", compute)


def valid_weights(value: np.ndarray) -> bool:
    """Whether attention weights are all finite and non-negative (NaN makes both comparisons false,
    inf the second: two reductions, no temporary array)."""
    return not value.size or bool(value.min() >= 0 and value.max() < np.inf)


def unit_features(record: Record) -> np.ndarray | None:
    """The record's features scaled to unit length ``[N, D]`` float64 (an all-zero row stays 0: it
    has no direction), or None without features. Raises ValueError naming the record on NaN or
    infinite features."""
    if record.features is None:
        return None
    feats = np.asarray(record.features, dtype=np.float64)
    if not np.isfinite(feats).all():
        raise DataError(f"record of {describe(record)}: features hold NaN or infinite values")
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)


@contextlib.contextmanager
def one_thread():
    """Run torch ops on one intra-op thread inside the block, then restore the caller's setting.

    One record's tensors are far too small for intra-op threads, and on a busy CPU torch's thread
    pool was measured 20-70x slower than one thread (entropy of [6, 8, 36, 36]: 23 ms vs 0.3 ms).
    Re-entrant: nested blocks cost nothing, so a collector switches once per record. Nothing to set
    while torch is not imported: the analyses import it only for what needs it (feature cosines,
    entropies from maps), inside a block of their own, so a process that reads stored entropies
    never pays torch's import (seconds: a stats-only dump's writer process)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_SHARED: dict | None = None   # per-record results shared by a collector's analyses, keyed by id(record)


@contextlib.contextmanager
def shared_per_record():
    """Inside the block, per-record derived arrays (feature cosines) are computed once per record
    and shared by every analysis (the collector wraps each ``update`` in it); outside, nothing is
    cached. Keys are ``id(record)``: valid while the block holds the records alive."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def shared(record: Record, name: str, compute):
    """``compute()``, computed once per record and ``name`` inside :func:`shared_per_record` (what
    several analyses derive from the same record), every time outside it."""
    if _SHARED is None:
        return compute()
    key = (name, id(record))
    if key not in _SHARED:
        _SHARED[key] = compute()
    return _SHARED[key]


def feature_cosines(record: Record) -> tuple[np.ndarray, np.ndarray] | None:
    """``(cosine [N, N] float64, nonzero [N] bool)`` of the record's object features, or None
    without features. ``nonzero`` is False for objects with an all-zero feature vector, which have
    no cosine (their rows and columns hold 0).

    One Gram matrix per record, in float64 by torch on one thread (numpy's ``@`` goes to OpenBLAS
    threads, measured 20x slower on a busy CPU; ``einsum`` 5x slower); shared between analyses
    inside :func:`shared_per_record`."""
    if record.features is None:
        return None

    def compute():
        import torch

        unit = unit_features(record)
        with one_thread():
            unit_t = torch.from_numpy(unit)
            gram = (unit_t @ unit_t.T).numpy()
        return np.clip(gram, -1.0, 1.0), (unit != 0).any(axis=1)

    return shared(record, "cosines", compute)


def encoder_head_mean(record: Record) -> np.ndarray | None:
    """``[L, N, N]`` float64: the record's encoder self-attention averaged over heads, or None
    (shared between analyses like :func:`feature_cosines`)."""
    def compute():
        attn = as_map(record, "encoder_self")
        return None if attn is None else attn.mean(axis=1)

    return shared(record, "encoder_head_mean", compute)


def encoder_rows(record: Record, given_similarity: bool):
    """The record's encoder rows prepared for within-row correlations (:class:`.rows.AttentionRows`):
    each regular object's row over the other regular ones; with ``given_similarity``, over the
    regular objects with nonzero features, for partial correlations given their feature cosine.
    None without encoder maps (or without features, when ``given_similarity``)."""
    def compute():
        head_mean = encoder_head_mean(record)
        queries = np.flatnonzero(regular_objects(record))
        if head_mean is None:
            return None
        if not given_similarity:
            return AttentionRows(head_mean, queries)
        cosines = feature_cosines(record)
        if cosines is None:
            return None
        cosine, nonzero = cosines
        return AttentionRows(head_mean, queries[nonzero[queries]], cosine)

    return shared(record, f"encoder_rows.{given_similarity}", compute)


class SumTable:
    """Named float64 arrays that only grow by addition; each name's shape is fixed by its first add.

    ``add(name, value)`` raises ValueError when a later value has another shape (records from two
    models with different layer/head counts cannot be pooled), naming the record when given.
    Scalars (the collector adds dozens of counts per record) are kept as Python floats, which add
    as float64 does (the same sums, bit for bit) at a fraction of a 0-d array's cost."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.scalars: dict[str, float] = {}

    def add(self, name: str, value, where: str = "") -> None:
        scalar = type(value) in _SCALAR_TYPES
        if not scalar:
            value = np.asarray(value, dtype=np.float64)
            scalar = value.shape == ()
        if scalar and name not in self.arrays:
            total = self.scalars.get(name)
            self.scalars[name] = float(value) if total is None else total + float(value)
            return
        current = self.arrays.get(name)
        shape = np.shape(value)
        if current is None and name not in self.scalars:
            self.arrays[name] = value.copy()
        elif current is None or current.shape != shape:
            earlier = () if current is None else current.shape
            raise DataError(f"{where or 'merge'}: {name} has shape {shape}, earlier records gave "
                             f"{earlier} (records with different layer/head counts cannot be pooled)")
        else:
            current += value

    def get(self, name: str) -> np.ndarray | None:
        """The sum of ``name`` (a 0-d array for a scalar), or None when nothing was added."""
        if name in self.scalars:
            return np.array(self.scalars[name])
        return self.arrays.get(name)

    def scalar(self, name: str) -> float:
        """A scalar sum (0 when nothing was added)."""
        if name in self.scalars:
            return self.scalars[name]
        value = self.arrays.get(name)
        return 0.0 if value is None else float(value)

    def merge(self, other: "SumTable") -> None:
        for name, value in other.arrays.items():
            self.add(name, value)
        for name, value in other.scalars.items():
            self.add(name, value)

    def state(self, prefix: str = "sum") -> dict[str, np.ndarray]:
        head = f"{prefix}{STATE_SEPARATOR}"
        out = {f"{head}{name}": value.copy() for name, value in self.arrays.items()}
        out.update({f"{head}{name}": np.array(value) for name, value in self.scalars.items()})
        return out

    @classmethod
    def from_state(cls, state: dict, prefix: str = "sum") -> "SumTable":
        table = cls()
        head = f"{prefix}{STATE_SEPARATOR}"
        for key, value in state.items():
            if key.startswith(head):
                value = np.array(value, dtype=np.float64)
                if value.shape == ():
                    table.scalars[key[len(head):]] = float(value)
                else:
                    table.arrays[key[len(head):]] = value
        return table


# what SumTable.add keeps as a Python float (np.float64 is a float; counts come as np.int64 from numpy sums)
_SCALAR_TYPES = frozenset({int, float, bool, np.float64, np.int64, np.int32, np.bool_, np.float32})


class SeenImages:
    """The image ids an accumulator has counted, so that what depends on the image alone (encoder
    maps, boxes, features: the same for every record of an image) is counted once per image.

    ``first(image_id)`` is True the first time an id is offered. ``merge`` refuses two parts that
    both counted an image (its sums would count twice; a dump's shards hold disjoint images).
    Memory: one integer per image."""

    def __init__(self):
        self.ids: set[int] = set()

    def first(self, image_id: int) -> bool:
        image_id = int(image_id)
        if image_id in self.ids:
            return False
        self.ids.add(image_id)
        return True

    def merge(self, other: "SeenImages", owner: str) -> None:
        both = self.ids & other.ids
        if both:
            raise DataError(f"{owner}: cannot merge two parts that both counted image {min(both)} "
                             f"({len(both)} images in both; merge parts of disjoint images)")
        self.ids |= other.ids

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{STATE_SEPARATOR}image_ids": np.asarray(sorted(self.ids), dtype=np.int64)}

    @classmethod
    def from_state(cls, state: dict, prefix: str, owner: str) -> "SeenImages":
        key = f"{prefix}{STATE_SEPARATOR}image_ids"
        if key not in state:
            raise DataError(f"{owner} state lacks {key!r} (not a state written by this version of geocap.analysis)")
        seen = cls()
        seen.ids = {int(i) for i in np.asarray(state[key]).ravel()}
        return seen


def ratio(numerator: np.ndarray | None, denominator: np.ndarray | None) -> np.ndarray | None:
    """``numerator / denominator`` elementwise, NaN where the denominator is 0 (callers turn NaN
    into None with :func:`to_list` and say why); None when either is missing."""
    if numerator is None or denominator is None:
        return None
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, float), np.asarray(denominator, float))
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def to_list(values):
    """A nested list of floats for JSON, with None where a value is not finite (never a NaN)."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0:
        return float(values) if np.isfinite(values) else None
    return [to_list(v) for v in values]


def config_state(**config) -> dict[str, np.ndarray]:
    """Numeric settings as 0-d arrays under ``config.<name>``."""
    return {f"config{STATE_SEPARATOR}{name}": np.asarray(value) for name, value in config.items()}


def read_config(state: dict, name: str, kind: type, owner: str):
    key = f"config{STATE_SEPARATOR}{name}"
    if key not in state:
        raise DataError(f"{owner} state lacks {key!r} (not a state written by this version of geocap.analysis)")
    return kind(np.asarray(state[key]))


class Accumulator:
    """Base of the four analyses' accumulators; see the module docstring for the protocol.

    Subclasses implement ``_update_image(records)`` (one image's validated records) or, when the
    records of an image share nothing worth computing once, ``_update(record)``; ``_merge(other)``,
    ``state()``, ``from_state(state)`` and ``result()``. Records of kind ``"hypothetical"`` are
    interventions, not the model's own behaviour: every analysis except grounding skips them and
    counts them under ``skipped_hypothetical``.
    """

    name = "analysis"

    def update(self, record: Record) -> "Accumulator":
        """Validate ``record`` (ValueError naming it on a bad shape) and add it; returns self."""
        return self.update_image([record])

    def update_image(self, records) -> "Accumulator":
        """Add the records of one image (a run of consecutive records with one image id, as a dump
        stores and sends them): the same sums as :meth:`update` on each in turn, up to float64
        summation order, but what adds up over the records' rows is computed once for all of them.
        ValueError naming the record on a bad one, or when the image ids differ. Returns self."""
        records = image_group(records, self.name)
        with one_thread():
            self._update_image(records)
        return self

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add every record ``other`` has seen; returns self."""
        if type(other) is not type(self):
            raise ValueError(f"{self.name}: cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self._merge(other)
        return self

    def _update(self, record: Record) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_image(self, records: list) -> None:
        """One image's validated records (by default each in turn through :meth:`_update`)."""
        for record in records:
            self._update(record)

    def _merge(self, other: "Accumulator") -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def skip_hypothetical(sums: SumTable, records: list) -> list:
    """The reference and generated records of ``records``, counted under ``records`` in ``sums``,
    the hypothetical ones (interventions, which every analysis but grounding skips) under
    ``skipped_hypothetical``."""
    counted = [r for r in records if r.kind != "hypothetical"]
    if len(counted) < len(records):
        sums.add("skipped_hypothetical", len(records) - len(counted))
    if counted:
        sums.add("records", len(counted))
    return counted


def image_group(records, owner: str) -> list:
    """``records`` as a list of validated Records of one image; ValueError naming the first record
    that is not a Record, fails validation or has another image id."""
    records = list(records)
    for record in records:
        if not isinstance(record, Record):
            raise ValueError(f"{owner}: expected a geocap.data.attention_record.Record, got {type(record).__name__}")
        record.validate()
        if record.image_id != records[0].image_id:
            raise DataError(f"{owner}: the records of one image were expected, got {describe(records[0])} and "
                            f"{describe(record)}")
    return records


def same_values(x, y) -> bool:
    """Whether two record fields (arrays, lists of arrays, None) hold the same values."""
    if x is y:
        return True
    if x is None or y is None:
        return False
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(same_values(a, b) for a, b in zip(x, y))
    return np.shape(x) == np.shape(y) and bool(np.array_equal(x, y))


def same_objects(a: Record, b: Record) -> bool:
    """Whether two records describe the same objects: equal boxes, labels, clusters, features and the
    ``extra`` entries about objects (special objects, referent regions, patch grid). The records of
    one image in a dump share these arrays, so the check is usually a few identity tests."""
    if a.num_objects != b.num_objects:
        return False
    if not all(same_values(getattr(a, name), getattr(b, name)) for name in ("boxes", "labels", "clusters", "features")):
        return False
    ea, eb = a.extra or {}, b.extra or {}
    return ea is eb or all(same_values(ea.get(key), eb.get(key))
                           for key in ("special_objects", "referent_objects", "patch_grid"))


def image_runs(records):
    """The runs of consecutive records with one image id of ``records`` (any iterable), as lists."""
    run: list = []
    for record in records:
        if run and getattr(record, "image_id", None) != run[0].image_id:
            yield run
            run = []
        run.append(record)
    if run:
        yield run


def rows_of(records: list, values: list, axis: int = -1) -> np.ndarray:
    """``values`` (one array per record, equal in shape but along ``axis``, the rows) joined along
    ``axis``; DataError naming the first record whose other dimensions differ from the first's."""
    def beside(shape: tuple) -> tuple:
        a = axis % len(shape) if shape else 0
        return shape[:a] + shape[a + 1:]

    first = beside(np.shape(values[0]))
    for record, value in zip(records, values):
        if beside(np.shape(value)) != first:
            raise DataError(f"record of {describe(record)}: shape {tuple(np.shape(value))} does not match "
                            f"{tuple(np.shape(values[0]))} of {describe(records[0])} beside the rows (records with "
                            f"different layer/head counts cannot be pooled)")
    return values[0] if len(values) == 1 else np.concatenate(values, axis=axis)


def fold(accumulator: Accumulator, records) -> Accumulator:
    """Update ``accumulator`` with every record of ``records`` (any iterable), a run of one image's
    records at a time (:meth:`Accumulator.update_image`); returns it."""
    for run in image_runs(records):
        accumulator.update_image(run)
    return accumulator
