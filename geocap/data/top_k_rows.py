"""Attention maps kept compact: the ``k`` largest weights of each row (float16 values, uint16
column indices), the form of the dump's ``--encoder-top-k`` and of the viewer's copy
(``geocap view --encoder-top-k``). numpy only.

A map ``[..., C]`` (rows over the last axis, each summing to 1) becomes ``values`` and
``index`` of shape ``[..., k]`` (``k = min(k, C)``; the kept columns in ascending order, ties
broken towards the lower column), and its error is stated per row: ``missing`` ``[...]``, the
weight the row loses (1 - the sum of its kept float16 weights, at least 0). Expanded again
(:func:`expand_top_k`) the dropped weights read as 0.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["MAX_COLUMNS", "TopKRows", "expand_top_k", "keep_top_k"]

MAX_COLUMNS = 65535             # uint16 column indices


class TopKRows(NamedTuple):
    """``values`` float16 ``[..., k]``, ``index`` uint16 ``[..., k]`` (ascending per row),
    ``missing`` float32 ``[...]`` (each row's lost weight), ``max_dropped``: the largest single
    weight dropped (0.0 when every column is kept)."""
    values: np.ndarray
    index: np.ndarray
    missing: np.ndarray
    max_dropped: float


def keep_top_k(array: np.ndarray, k: int) -> TopKRows:
    """The ``k`` largest weights of each row of ``array`` ``[..., C]`` (see the module doc).
    ValueError for ``k`` < 1 or more than :data:`MAX_COLUMNS` columns."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top-k: k must be a positive int, got {k!r}")
    data = np.asarray(array, dtype=np.float16)
    columns = data.shape[-1]
    if columns > MAX_COLUMNS:
        raise ValueError(f"top-k: a map has at most {MAX_COLUMNS} columns, got {columns}")
    k = min(int(k), columns)
    order = np.argsort(-data.astype(np.float32), axis=-1, kind="stable")
    index = np.sort(order[..., :k], axis=-1)
    values = np.take_along_axis(data, index, axis=-1)
    missing = np.maximum(0.0, 1.0 - values.astype(np.float64).sum(axis=-1)).astype(np.float32)
    max_dropped = 0.0
    if k < columns and data.size:
        max_dropped = float(np.take_along_axis(data, order[..., k:k + 1], axis=-1).max())
    return TopKRows(values, index.astype(np.uint16), missing, max_dropped)


def expand_top_k(values: np.ndarray, index: np.ndarray, columns: int) -> np.ndarray:
    """The dense float16 map ``[..., columns]`` of :func:`keep_top_k`'s ``values`` and ``index``
    (``[..., k]``), the dropped weights 0. ValueError when the shapes differ or an index is out
    of range."""
    values, index = np.asarray(values), np.asarray(index)
    if values.shape != index.shape:
        raise ValueError(f"top-k: values {values.shape} and index {index.shape} differ in shape")
    if index.size and int(index.max()) >= columns:
        raise ValueError(f"top-k: column index {int(index.max())} out of range for {columns} columns")
    dense = np.zeros(values.shape[:-1] + (columns,), dtype=np.float16)
    np.put_along_axis(dense, index.astype(np.int64), values.astype(np.float16), axis=-1)
    return dense
