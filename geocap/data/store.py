"""The feature store: geocap's own HDF5 file of detector features, written once, read at random.

Layout (one file, format ``geocap-features`` version 1)::

    features     [total_boxes, D]   float16 (default) or float32; image i's boxes are rows
                                     offsets[i]:offsets[i+1], contiguous, in the source's order
    boxes        [total_boxes, 4]   float32 (x1, y1, x2, y2) normalised to [0, 1]
    offsets      [n_images + 1]     int64, offsets[0] = 0, non-decreasing
    image_ids    [n_images]         int64, unique
    image_sizes  [n_images, 2]      int32 (width, height) in pixels, -1 where unknown
    labels       [total_boxes]      int32 detector class ids, -1 where unknown (only when some
                                     image has labels)
    label_names  [n_labels]         UTF-8 strings (only when given)

    attributes: format, format_version, feature_dim, feature_dtype, n_images, n_boxes

The lookup by image id is a dict built from ``image_ids`` when the file is opened.

Chunking: features are chunked in whole rows, ~1 MiB per chunk (256 rows at D=2048 float16,
about seven images of 36 boxes), boxes and labels 8192 rows per chunk. Files are read with
HDF5's chunk cache switched off, so reading one image fetches exactly its rows. Measured on
random single-image reads (10-100 boxes, D=2048 float16, file in the page cache): ~20 us per
image with the cache off, 45-140 us with HDF5's default 1 MiB cache (which reads whole chunks
of up to 1 MiB into it: the bigger the chunk, the slower); with the cache off the chunk size
matters little (38 us at 64 KiB chunks, 16 us at 16 MiB), so it is chosen for the writer. No
compression, so that reads stay direct.

Writes are atomic: ``write_store`` writes ``<path>.tmp-<pid>`` and renames it over ``path``
only when complete, so readers never see a partial file (and the files are opened without
HDF5 file locking, which fails on some network file systems).
"""
from __future__ import annotations

import operator
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import h5py
import numpy as np

from geocap import stop
from geocap.data.atomic import atomic_output
from geocap.data.hdf5_errors import HDF5_ERRORS, named_hdf5_errors, open_hdf5
from geocap.data.items import DataError, ImageFeatures
from geocap.progress import progress_bar

FORMAT = "geocap-features"
FORMAT_VERSION = 1
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
CHUNK_BYTES = 1 << 20          # target bytes per features chunk
BOX_CHUNK_ROWS = 8192          # rows per boxes / labels chunk (128 KiB of boxes)
FLUSH_BYTES = 32 << 20         # the writer buffers this many feature bytes between writes
BOX_TOLERANCE = 1e-4           # coordinates this far outside [0, 1] are clipped, further ones rejected
REQUIRED = ("features", "boxes", "offsets", "image_ids", "image_sizes")


def feature_chunk_rows(feature_dim: int, itemsize: int) -> int:
    """Rows per features chunk: ~``CHUNK_BYTES``, at least 32 and at most 8192 rows."""
    return int(min(8192, max(32, CHUNK_BYTES // max(1, feature_dim * itemsize))))


@dataclass
class StoreStats:
    """What ``write_store`` wrote. ``skipped`` lists (image_id, reason) for each record left
    out under ``on_error="skip"`` (image_id None when the record had no usable id)."""
    path: str
    n_images: int
    n_boxes: int
    feature_dim: int
    feature_dtype: str
    has_labels: bool
    file_bytes: int
    seconds: float
    skipped: list = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


# ---------------------------------------------------------------------------- validation


def _image_id(record) -> int:
    raw = getattr(record, "image_id", None)
    if isinstance(raw, (bool, np.bool_)):
        raise DataError(f"image id {raw!r} is a bool, not an int")
    try:
        return operator.index(raw)
    except TypeError:
        raise DataError(f"image id {raw!r} is not an int") from None


def _checked(record: ImageFeatures, image_id: int, feature_dim: Optional[int], n_labels: Optional[int],
             storage_dtype) -> tuple:
    """(features float32 [N, D], boxes float32 [N, 4], width, height, labels int64 [N] | None)
    or DataError naming the image id."""
    where = f"image {image_id}"
    try:
        feats = np.asarray(record.features, dtype=np.float32)
        boxes = np.asarray(record.boxes, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: features/boxes are not numeric arrays ({err})") from None
    if feats.ndim != 2:
        raise DataError(f"{where}: features must be [N, D], got shape {feats.shape}")
    n, d = feats.shape
    if n == 0:
        raise DataError(f"{where}: has no boxes")
    if d == 0:
        raise DataError(f"{where}: features have dimension 0")
    if feature_dim is not None and d != feature_dim:
        raise DataError(f"{where}: feature dimension {d} differs from the store's {feature_dim}")
    if boxes.shape != (n, 4):
        raise DataError(f"{where}: boxes must be [{n}, 4] to match features {feats.shape}, got {boxes.shape}")
    bad = ~np.isfinite(feats)
    if bad.any():
        raise DataError(f"{where}: features contain {int(bad.sum())} NaN/inf values")
    if storage_dtype == np.float16:
        peak = float(np.abs(feats).max())
        if peak > float(np.finfo(np.float16).max):
            raise DataError(f"{where}: features reach {peak:.6g}, beyond float16's range; "
                            f"store them as float32")
    if not np.isfinite(boxes).all():
        raise DataError(f"{where}: boxes contain NaN/inf")
    lo, hi = float(boxes.min()), float(boxes.max())
    if lo < -BOX_TOLERANCE or hi > 1 + BOX_TOLERANCE:
        row = int(np.argwhere((boxes < -BOX_TOLERANCE) | (boxes > 1 + BOX_TOLERANCE))[0, 0])
        raise DataError(f"{where}: box {row} {boxes[row].tolist()} lies outside [0, 1] "
                        f"(boxes must be normalised by the image size, not in pixels)")
    if lo < 0 or hi > 1:
        boxes = np.clip(boxes, 0.0, 1.0)
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        row = int(np.argmax(flipped))
        raise DataError(f"{where}: box {row} {boxes[row].tolist()} has x2 < x1 or y2 < y1")
    size = []
    for name in ("width", "height"):
        value = getattr(record, name, None)
        if value is None:
            size.append(-1)
            continue
        try:
            value = operator.index(value)
        except TypeError:
            raise DataError(f"{where}: {name} {value!r} is not an int") from None
        if not 0 < value < 2 ** 31:
            raise DataError(f"{where}: {name} {value} is not a positive size")
        size.append(value)
    labels = getattr(record, "labels", None)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{where}: labels must be {n} ints, got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
        if n and (labels.min() < 0 or (n_labels is not None and labels.max() >= n_labels)):
            limit = f"[0, {n_labels})" if n_labels is not None else "non-negative"
            raise DataError(f"{where}: labels must be {limit}, got {labels.min()}..{labels.max()}")
    return feats, boxes, size[0], size[1], labels


# ---------------------------------------------------------------------------- writing


class _Writer:
    """Appends validated records to an open h5py file in buffered blocks."""

    def __init__(self, h5: h5py.File, feature_dim: int, dtype, label_names):
        self.h5, self.dtype, self.feature_dim = h5, dtype, feature_dim
        rows = feature_chunk_rows(feature_dim, np.dtype(dtype).itemsize)
        self.features = h5.create_dataset("features", shape=(0, feature_dim), maxshape=(None, feature_dim),
                                          dtype=dtype, chunks=(rows, feature_dim))
        self.boxes = h5.create_dataset("boxes", shape=(0, 4), maxshape=(None, 4), dtype=np.float32,
                                       chunks=(BOX_CHUNK_ROWS, 4))
        self.labels = None
        if label_names is not None:
            h5.create_dataset("label_names", data=np.array(list(label_names), dtype=object),
                              dtype=h5py.string_dtype("utf-8"))
        self.flush_rows = max(rows, FLUSH_BYTES // (feature_dim * np.dtype(dtype).itemsize))
        self.buffer: list = []
        self.buffered = 0
        self.written = 0

    def append(self, feats, boxes, labels):
        if labels is not None and self.labels is None:
            # the first image with labels: earlier rows get -1 (unknown)
            self.labels = self.h5.create_dataset("labels", shape=(self.written,), maxshape=(None,),
                                                 dtype=np.int32, chunks=(BOX_CHUNK_ROWS,), fillvalue=-1)
        self.buffer.append((feats.astype(self.dtype), boxes, labels))
        self.buffered += len(feats)
        if self.buffered >= self.flush_rows:
            self.flush()

    def flush(self):
        if not self.buffer:
            return
        start, stop = self.written, self.written + self.buffered
        self.features.resize(stop, axis=0)
        self.features[start:stop] = np.concatenate([b[0] for b in self.buffer])
        self.boxes.resize(stop, axis=0)
        self.boxes[start:stop] = np.concatenate([b[1] for b in self.buffer])
        if self.labels is not None:
            self.labels.resize(stop, axis=0)
            self.labels[start:stop] = np.concatenate(
                [b[2] if b[2] is not None else np.full(len(b[1]), -1) for b in self.buffer]).astype(np.int32)
        self.written = stop
        self.buffer, self.buffered = [], 0


def write_store(path, records: Iterable[ImageFeatures], *, feature_dtype: str = "float16",
                label_names: Optional[Sequence[str]] = None, n_images: Optional[int] = None,
                on_error: str = "raise", progress: bool = True) -> StoreStats:
    """Stream ``records`` into a feature store at ``path``; return what was written.

    Records are validated as they come (finite features, the same D throughout, at least one
    box, boxes in [0, 1] with x1 <= x2 and y1 <= y2, unique ids, labels within
    ``label_names``); a bad record raises ``DataError`` naming its image id or, with
    ``on_error="skip"``, is left out and listed in ``StoreStats.skipped``. Coordinates within
    1e-4 of [0, 1] are clipped into it. Features are taken as float32 and stored as
    ``feature_dtype`` ("float16": round to nearest, values beyond +-65504 rejected).
    Memory stays bounded (~32 MB of buffered features) whatever the number of records.

    The file appears at ``path`` only once complete (a temporary ``<path>.tmp-<pid>`` is
    renamed over it); on any error or interruption the temporary file is removed and an
    existing ``path`` is left untouched. ``n_images`` only sizes the progress bar.
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = os.fspath(path)
    dtype = FEATURE_DTYPES[feature_dtype]
    n_labels = None if label_names is None else len(label_names)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    started = time.perf_counter()
    skipped: list = []
    position: dict = {}
    sizes: list = []
    counts: list = []
    writer = None
    bar = progress_bar(total=n_images, enabled=progress, unit="img", desc=f"writing {os.path.basename(path)}")
    try:
        with atomic_output(path) as tmp, h5py.File(tmp, "w", locking=False) as h5:
            for record in records:
                stop.check()
                bar.update(1)
                image_id = None
                try:
                    image_id = _image_id(record)
                    if image_id in position:
                        raise DataError(f"image {image_id}: appears twice (already stored at position "
                                        f"{position[image_id]})")
                    feats, boxes, width, height, labels = _checked(
                        record, image_id, writer.feature_dim if writer else None, n_labels, dtype)
                except DataError as err:
                    if on_error == "raise":
                        raise DataError(f"{err} (writing {path})") from None
                    skipped.append((image_id, str(err)))
                    bar.set_postfix_str(f"{len(skipped)} skipped", refresh=False)
                    continue
                if writer is None:
                    writer = _Writer(h5, feats.shape[1], dtype, label_names)
                position[image_id] = len(counts)
                counts.append(len(feats))
                sizes.append((width, height))
                writer.append(feats, boxes, labels)
            if writer is None:
                why = f"all {len(skipped)} records were skipped" if skipped else "there were no records"
                raise DataError(f"nothing to write to {path}: {why}")
            writer.flush()
            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            h5.create_dataset("offsets", data=offsets)
            h5.create_dataset("image_ids", data=np.fromiter(position, dtype=np.int64, count=len(position)))
            h5.create_dataset("image_sizes", data=np.asarray(sizes, dtype=np.int32).reshape(-1, 2))
            h5.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                             "feature_dim": writer.feature_dim, "feature_dtype": feature_dtype,
                             "n_images": len(counts), "n_boxes": int(offsets[-1])})
            has_labels = writer.labels is not None
    finally:
        bar.close()
    return StoreStats(path=path, n_images=len(counts), n_boxes=int(offsets[-1]), feature_dim=writer.feature_dim,
                      feature_dtype=feature_dtype, has_labels=has_labels, file_bytes=os.path.getsize(path),
                      seconds=time.perf_counter() - started, skipped=skipped)


# ---------------------------------------------------------------------------- reading


class _Open:
    """One process's open file and the small per-image tables read from it."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such feature store")
        try:
            self.h5 = open_hdf5(path, "HDF5 file (not a feature store, or truncated)", locking=False, rdcc_nbytes=0)
        except DataError:
            raise
        except HDF5_ERRORS as err:
            raise DataError(f"{path}: unreadable feature store (corrupt or truncated?): {err}") from None
        try:
            with named_hdf5_errors(path, "feature store"):
                self._load(path)
        except BaseException:
            self.h5.close()
            raise

    def _load(self, path: str):
        h5 = self.h5
        fmt = h5.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            raise DataError(f"{path}: not a geocap feature store (format attribute {fmt!r}, expected {FORMAT!r})")
        version = int(h5.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise DataError(f"{path}: feature store format version {version}; this geocap reads version "
                            f"{FORMAT_VERSION}")
        missing = [name for name in REQUIRED if name not in h5]
        if missing:
            raise DataError(f"{path}: incomplete feature store, missing {', '.join(missing)}")
        self.features, self.boxes = h5["features"], h5["boxes"]
        self.labels = h5["labels"] if "labels" in h5 else None
        self.offsets = h5["offsets"][()].astype(np.int64)
        self.image_ids = h5["image_ids"][()].astype(np.int64)
        self.image_sizes = h5["image_sizes"][()].astype(np.int32)
        names = h5["label_names"][()] if "label_names" in h5 else None
        self.label_names = None if names is None else [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        n, total = len(self.image_ids), self.features.shape[0]
        consistent = (
            self.features.ndim == 2 and self.boxes.shape == (total, 4) and self.offsets.shape == (n + 1,)
            and self.image_sizes.shape == (n, 2) and n > 0 and self.offsets[0] == 0 and self.offsets[-1] == total
            and bool((np.diff(self.offsets) >= 0).all())
            and (self.labels is None or self.labels.shape == (total,))
            and int(h5.attrs.get("n_images", n)) == n)
        if not consistent:
            raise DataError(f"{path}: inconsistent feature store (dataset shapes or offsets disagree)")
        self.position = dict(zip(self.image_ids.tolist(), range(n)))
        if len(self.position) != n:
            raise DataError(f"{path}: feature store lists some image id twice")


class FeatureStore:
    """Read-only access to a feature store written by ``write_store``.

    The file is opened lazily, on first use in each process (a handle inherited through
    ``fork`` is dropped and the file reopened), and pickling keeps only the path, so a store
    can be handed to DataLoader workers. A missing, foreign, truncated or inconsistent file
    raises ``DataError`` naming it, on first use.

    ``get(image_id)`` / ``store[i]`` return ``ImageFeatures`` with float32 features
    ``[N, D]``, float32 boxes ``[N, 4]``, width/height (None when unknown) and int64 labels
    (None when the store has none for that image).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._state: Optional[_Open] = None
        self._pid: Optional[int] = None

    # -- lifecycle
    @property
    def _open(self) -> _Open:
        pid = os.getpid()
        if self._state is None or self._pid != pid:
            if self._state is not None:  # inherited through fork: this process's copy only
                self._drop()
            self._state, self._pid = _Open(self.path), pid
        return self._state

    def _drop(self):
        state, self._state, self._pid = self._state, None, None
        if state is not None:
            try:
                state.h5.close()
            except Exception:  # pragma: no cover - closing a handle is best effort
                pass

    def close(self) -> None:
        """Close this process's handle (the next access reopens the file)."""
        if self._state is not None and self._pid == os.getpid():
            self._drop()
        else:
            self._state, self._pid = None, None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"FeatureStore({self.path!r})"

    # -- metadata
    def __len__(self) -> int:
        return len(self._open.image_ids)

    @property
    def image_ids(self) -> np.ndarray:
        """int64 ``[n_images]``, in storage order."""
        return self._open.image_ids

    @property
    def image_sizes(self) -> np.ndarray:
        """int32 ``[n_images, 2]`` (width, height), -1 where unknown."""
        return self._open.image_sizes

    @property
    def box_counts(self) -> np.ndarray:
        """int64 ``[n_images]``: boxes per image, in storage order."""
        return np.diff(self._open.offsets)

    @property
    def feature_dim(self) -> int:
        return int(self._open.features.shape[1])

    @property
    def feature_dtype(self) -> np.dtype:
        """The stored dtype (float16 or float32); reads return float32 unless asked otherwise."""
        return self._open.features.dtype

    @property
    def n_boxes(self) -> int:
        return int(self._open.features.shape[0])

    @property
    def has_labels(self) -> bool:
        return self._open.labels is not None

    @property
    def label_names(self) -> Optional[list]:
        return self._open.label_names

    def index_of(self, image_id) -> int:
        """Storage position of ``image_id``; DataError naming the id and the file if absent."""
        try:
            return self._open.position[operator.index(image_id)]
        except (KeyError, TypeError):
            raise DataError(f"{self.path}: no features for image {image_id!r}") from None

    def __contains__(self, image_id) -> bool:
        try:
            return operator.index(image_id) in self._open.position
        except TypeError:
            return False

    # -- data
    def read(self, i: int, *, float32: bool = True) -> tuple:
        """Position ``i``'s (features ``[N, D]``, boxes float32 ``[N, 4]``), ``0 <= i < len``
        (unchecked); features float32, or in the stored dtype when ``float32`` is false. The
        fast path for data loaders. NaN or inf values (which write_store never stores: a file
        damaged or written by something else) raise DataError naming the file, the image id and
        the box."""
        s = self._open
        a, b = int(s.offsets[i]), int(s.offsets[i + 1])
        where = f"{self.path}: image {int(s.image_ids[i])}"
        with named_hdf5_errors(where, "feature store"):
            feats, boxes = s.features[a:b], s.boxes[a:b]
        for name, values in (("features", feats), ("boxes", boxes)):
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                kind = "NaN" if np.isnan(values[row]).any() else "inf"
                raise DataError(f"{where}: {name} hold {kind} values (box {row}; {int(bad.sum())} boxes affected)")
        return (feats.astype(np.float32) if float32 else feats), boxes

    def __getitem__(self, i: int) -> ImageFeatures:
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"position {i} out of range for {n} images in {self.path}")
        i %= n
        s = self._open
        feats, boxes = self.read(i)
        labels = None
        if s.labels is not None:
            with named_hdf5_errors(f"{self.path}: image {int(s.image_ids[i])}", "feature store"):
                labels = s.labels[int(s.offsets[i]):int(s.offsets[i + 1])].astype(np.int64)
            if (labels < 0).all():
                labels = None
        width, height = (int(v) for v in s.image_sizes[i])
        return ImageFeatures(image_id=int(s.image_ids[i]), features=feats, boxes=boxes,
                             width=width if width >= 0 else None, height=height if height >= 0 else None,
                             labels=labels)

    def get(self, image_id) -> ImageFeatures:
        """The record of ``image_id`` (DataError naming the id and the file when absent)."""
        return self[self.index_of(image_id)]

    def __iter__(self) -> Iterator[ImageFeatures]:
        """Every record in storage order, read in blocks of ~``FLUSH_BYTES`` (for copying)."""
        s = self._open
        per_row = max(1, self.feature_dim * s.features.dtype.itemsize)
        block_rows = max(1, FLUSH_BYTES // per_row)
        i, n = 0, len(self)
        while i < n:
            j = int(np.searchsorted(s.offsets, s.offsets[i] + block_rows, side="right")) - 1
            j = min(n, max(j, i + 1))
            a, b = int(s.offsets[i]), int(s.offsets[j])
            with named_hdf5_errors(f"{self.path}: images {int(s.image_ids[i])}..{int(s.image_ids[j - 1])}",
                                   "feature store"):
                feats = s.features[a:b].astype(np.float32)
                boxes = s.boxes[a:b]
                labels = s.labels[a:b].astype(np.int64) if s.labels is not None else None
            for k in range(i, j):
                lo, hi = int(s.offsets[k]) - a, int(s.offsets[k + 1]) - a
                lab = None if labels is None or (labels[lo:hi] < 0).all() else labels[lo:hi]
                width, height = (int(v) for v in s.image_sizes[k])
                yield ImageFeatures(image_id=int(s.image_ids[k]), features=feats[lo:hi], boxes=boxes[lo:hi],
                                    width=width if width >= 0 else None, height=height if height >= 0 else None,
                                    labels=lab)
            i = j
