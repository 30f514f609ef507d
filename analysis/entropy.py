"""Analysis III of Ilinykh (2022), the seed study (:mod:`geocap.analysis`): attention entropy per layer and head.

Statistic, for each attention kind (``encoder_self``, ``decoder_self``, ``cross``) and each
layer ``l`` and head ``h``: the mean over attention rows of the *normalised entropy*
``H(row) / log(n)``, ``n`` = the row's valid keys (1 = uniform over the valid keys, 0 = all mass
on one key). Valid keys: the image's N objects for encoder self- and cross-attention; the
``t + 1`` inputs ``<bos>, tokens[0], ..., tokens[t-1]`` for decoder self-attention row ``t``
(causal). Rows with fewer than two valid keys (decoder row 0; images with one object) have no
defined normalised entropy and are excluded. The mean is pooled: the sum over all rows of all
records divided by their number (records with more rows weigh more).

Entropies come from the record's ``*_entropy`` field when present (the fused attention kernels
computed them online from the logits, in float32, before the maps were rounded to float16),
otherwise from the map itself through the streaming entropy op
:func:`geocap.kernels.attention_entropy` (``normalized=True``, causal mask for the decoder).
Records of kind ``"hypothetical"`` are skipped (counted). State: ``[L, H]`` sums and row counts
per kind; memory does not depend on the number of records.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from geocap.data.attention_record import ENTROPY_NAMES, MAP_NAMES, Record

from .accumulator import (Accumulator, SumTable, describe, fold, one_thread, ratio, rows_of, skip_hypothetical,
                          to_list)
from .uncertainty import ImageUnits, layer_uncertainty, trend_phrase, uncertainty_json
from geocap.errors import DataError

if TYPE_CHECKING:
    import torch


def _valid_keys(kind: str, rows: int, num_objects: int) -> np.ndarray:
    """Valid keys of each row ``[rows]``: ``t + 1`` for decoder self-attention, else N."""
    if kind == "decoder_self":
        return np.arange(1, rows + 1)
    return np.full(rows, num_objects)


@functools.lru_cache(maxsize=64)
def _causal_mask(t: int) -> torch.Tensor:
    """``[t, t]`` bool, True on and below the diagonal (cached per length: never modify it). Built in
    numpy: under CPU contention torch's ``tril`` on a tiny tensor was measured at ~20 ms a call."""
    import torch

    return torch.from_numpy(np.tril(np.ones((t, t), dtype=bool)))


@functools.lru_cache(maxsize=256)
def _row_scale(kind: str, rows: int, num_objects: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(used [rows] bool, log(valid keys) of the used rows, every row used)`` (cached per shape: a
    collector asks for it three times per record; never modify the arrays)."""
    valid = _valid_keys(kind, rows, num_objects)
    used = valid >= 2
    return used, np.log(valid[used]), bool(used.all())


def normalised_entropy(record: Record, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(entropy [L, H, R] / log(valid keys), used [R] bool)`` for one attention kind of one
    record (``used``: rows with at least two valid keys), or None when the record has neither the
    map nor its entropies. Raises ValueError naming the record on invalid weights."""
    stored = getattr(record, ENTROPY_NAMES[kind])
    if stored is not None:
        nats = np.asarray(stored, dtype=np.float64)
        if not np.isfinite(nats).all():
            raise DataError(f"record of {describe(record)}: {ENTROPY_NAMES[kind]} holds NaN or infinite values")
        used, log_valid, every_row = _row_scale(kind, nats.shape[-1], record.num_objects)
        if every_row:
            return nats / log_valid, used
        out = np.zeros_like(nats)
        out[..., used] = nats[..., used] / log_valid
        return out, used
    weights = getattr(record, kind)
    if weights is None:
        return None
    import torch                      # (here: records with stored entropies need neither torch nor the kernels)

    from geocap.kernels import attention_entropy

    x = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    mask = None
    if kind == "decoder_self":
        mask = _causal_mask(x.shape[-1])
    try:
        with one_thread():
            out = attention_entropy(x, mask, normalized=True, backend="torch").numpy().astype(np.float64)
    except ValueError as err:
        raise DataError(f"record of {describe(record)}: {kind}: {err}") from None
    return out, _valid_keys(kind, x.shape[-2], record.num_objects) >= 2


def image_entropy(records: list, kind: str) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """``(entropy [L, H, R] / log(valid keys), used [R] bool, missing)`` of one attention kind over
    the rows of ``records`` (one image's), joined in record order: what :func:`normalised_entropy`
    gives for each record that has the map or its entropies (``missing``: how many have neither;
    ``(None, None, missing)`` when none has). Stored entropies are converted and checked once for
    all records; an invalid one is named as :func:`normalised_entropy` names it."""
    stored = [getattr(r, ENTROPY_NAMES[kind]) for r in records]
    if all(value is not None for value in stored):
        nats = np.asarray(rows_of(records, stored), dtype=np.float64)
        if np.isfinite(nats).all():
            scales = [_row_scale(kind, np.shape(value)[-1], r.num_objects) for r, value in zip(records, stored)]
            if len(scales) == 1:
                used, log_valid, every_row = scales[0]
            else:
                used, log_valid = (np.concatenate([s[i] for s in scales]) for i in (0, 1))
                every_row = all(s[2] for s in scales)
            if every_row:
                return nats / log_valid, used, 0
            out = np.zeros_like(nats)
            out[..., used] = nats[..., used] / log_valid
            return out, used, 0
    got = [(r, normalised_entropy(r, kind)) for r in records]          # names an invalid record
    present = [(r, g) for r, g in got if g is not None]
    if not present:
        return None, None, len(records)
    values = rows_of([r for r, _ in present], [g[0] for _, g in present])
    used = np.concatenate([g[1] for _, g in present])
    return values, used, len(records) - len(present)


@dataclass
class EntropyResult:
    """Mean normalised entropy ``[L, H]`` per attention kind (None where not computable, with the
    reason in ``unavailable``), the rows behind each mean, and records lacking each kind."""

    per_head: dict = field(default_factory=dict)        # kind -> np.ndarray [L, H] (NaN: no rows)
    rows: dict = field(default_factory=dict)            # kind -> rows averaged
    missing: dict = field(default_factory=dict)         # kind -> records without map or entropy
    uncertainty: dict = field(default_factory=dict)     # kind -> per-layer standard errors and trend
    records: int = 0
    skipped_hypothetical: int = 0
    unavailable: dict = field(default_factory=dict)     # kind -> reason

    def per_layer(self, kind: str) -> np.ndarray | None:
        """Mean over heads ``[L]`` (every head averages the same rows, so this is the pooled mean)."""
        values = self.per_head.get(kind)
        return None if values is None else values.mean(axis=1)

    def to_json(self) -> dict:
        out = {kind: to_list(self.per_head.get(kind)) for kind in MAP_NAMES}
        out["per_layer"] = {kind: to_list(self.per_layer(kind)) for kind in MAP_NAMES}
        out["per_layer_uncertainty"] = {kind: uncertainty_json(self.uncertainty.get(kind)) for kind in MAP_NAMES}
        out["rows"] = {kind: int(self.rows.get(kind, 0)) for kind in MAP_NAMES}
        out["records_missing"] = {kind: int(self.missing.get(kind, 0)) for kind in MAP_NAMES}
        out["records"] = self.records
        out["skipped_hypothetical"] = self.skipped_hypothetical
        out["unavailable"] = dict(self.unavailable)
        return out

    def reading(self) -> str:
        """Two or three sentences on the numbers, for the report."""
        parts = []
        for kind in MAP_NAMES:
            layers = self.per_layer(kind)
            if layers is None:
                parts.append(f"{kind}: not computed ({self.unavailable[kind]}).")
                continue
            counted = " (an image's encoder rows once per record)" if kind == "encoder_self" else ""
            parts.append(f"{kind}: normalised entropy {trend_phrase(layers, self.uncertainty.get(kind))}; range over "
                         f"heads {np.min(self.per_head[kind]):.3f}-{np.max(self.per_head[kind]):.3f}; "
                         f"{self.rows[kind]} rows of {self.records} records{counted}.")
        return " ".join(parts)

    def plot(self, path) -> None:
        from .plotting import plot_entropy

        plot_entropy(self, path)


class EntropyAccumulator(Accumulator):
    """Streaming sums behind :class:`EntropyResult`; see the module docstring."""

    name = "entropy"

    def __init__(self):
        self.sums = SumTable()
        self.units = ImageUnits()

    def _update_image(self, records: list) -> None:
        counted = skip_hypothetical(self.sums, records)
        if not counted:
            return
        where = describe(counted[0])
        for kind in MAP_NAMES:
            values, used, missing = image_entropy(counted, kind)
            if missing:
                self.sums.add(f"{kind}.missing", missing)
            if values is None:
                continue
            rows = int(used.sum())
            sums = values[..., used].sum(axis=-1)     # (the boolean index's layout fixes the summation order)
            self.sums.add(f"{kind}.sum", sums, where)
            self.sums.add(f"{kind}.rows", rows)
            # the head mean as sum / H: what ndarray.mean computes for float64, without its Python wrapper
            self.units.add(self.sums, f"units.{kind}", counted[0].image_id, sums.sum(axis=1) / sums.shape[1], rows,
                           where)

    def _merge(self, other: "EntropyAccumulator") -> None:
        self.units.flush(self.sums)
        other.units.flush(other.sums)
        self.sums.merge(other.sums)

    def state(self) -> dict[str, np.ndarray]:
        self.units.flush(self.sums)
        return self.sums.state()

    @classmethod
    def from_state(cls, state: dict) -> "EntropyAccumulator":
        acc = cls()
        acc.sums = SumTable.from_state(state)
        return acc

    def result(self) -> EntropyResult:
        self.units.flush(self.sums)
        records = int(self.sums.scalar("records"))
        res = EntropyResult(records=records, skipped_hypothetical=int(self.sums.scalar("skipped_hypothetical")))
        for kind in MAP_NAMES:
            rows = self.sums.scalar(f"{kind}.rows")
            res.rows[kind] = int(rows)
            res.missing[kind] = int(self.sums.scalar(f"{kind}.missing"))
            total = self.sums.get(f"{kind}.sum")
            if records == 0:
                res.unavailable[kind] = "no reference or generated records"
            elif total is None:
                res.unavailable[kind] = (f"none of the {records} records has {kind} maps or "
                                         f"{ENTROPY_NAMES[kind]} (not recorded)")
            elif rows == 0:
                res.unavailable[kind] = "no attention row has two or more valid keys"
            else:
                res.per_head[kind] = ratio(total, rows)
                res.uncertainty[kind] = layer_uncertainty(self.sums, f"units.{kind}")
        return res


def entropy(records) -> EntropyResult:
    """Mean normalised attention entropy per layer and head over ``records`` (any iterable of
    :class:`~geocap.data.attention_record.Record`); see the module docstring."""
    return fold(EntropyAccumulator(), records).result()
