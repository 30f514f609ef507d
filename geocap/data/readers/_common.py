"""What every feature reader shares: the stats object, the stream it fills, error handling, and
the one place where a detector's raw output becomes an :class:`ImageFeatures`.

Conventions (see ``geocap/data/items.py``): features float32 ``[N, D]``; boxes float32
``[N, 4]`` (x1, y1, x2, y2) normalised to [0, 1] by the image width and height, in the order of
the source file. The readers never re-sort boxes (some loaders sort them by area; we do not).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np

from ..items import DataError, ImageFeatures
from ..json_file import read_json

ON_ERROR = ("raise", "skip")

# A normalised coordinate this far outside [0, 1] is not a detector box spilling over the edge
# but boxes in the wrong units (pixels read as relative) or a wrong image size: refuse it
# instead of clipping everything to the border.
FAR_OUTSIDE = 0.5


@dataclass
class ReadStats:
    """Counts a feature stream fills while it is consumed.

    images: images yielded; clipped_boxes: boxes that reached outside the image and were clipped
    to it (their images are still yielded); skipped_images: images dropped under
    ``on_error="skip"`` (bad records and requested ids that are absent); errors: the messages of
    the first ``max_errors`` of those.
    """
    images: int = 0
    clipped_boxes: int = 0
    skipped_images: int = 0
    errors: list = field(default_factory=list)
    max_errors: int = 100

    def skip(self, message: str) -> None:
        self.skipped_images += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(message)


class FeatureStream(Iterator[ImageFeatures]):
    """An iterator of :class:`ImageFeatures` read lazily from ``path``; ``stats`` fills as it goes.

    Files are opened on the first ``next()`` and closed when the stream ends, is closed, or
    leaves a ``with`` block.
    """

    def __init__(self, path, records: Iterator[ImageFeatures], stats: ReadStats):
        self.path = path
        self.stats = stats
        self._records = records

    def __iter__(self) -> "FeatureStream":
        return self

    def __next__(self) -> ImageFeatures:
        return next(self._records)

    def close(self) -> None:
        self._records.close()

    def __enter__(self) -> "FeatureStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.path)!r}, {self.stats})"


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def handle(error: DataError, on_error: str, stats: ReadStats) -> None:
    """Re-raise ``error`` (on_error="raise") or count it and let the caller continue."""
    if on_error == "raise":
        raise error
    stats.skip(str(error))


def requested_ids(image_ids: Optional[Iterable[int]]) -> Optional[list]:
    """The caller's ids as a list of ints (order kept), or None for "every image in the file"."""
    if image_ids is None:
        return None
    ids = [int(i) for i in image_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"image_ids lists image {first_duplicate(ids)} more than once")
    return ids


def first_duplicate(values):
    """The first value of ``values`` seen before (None when all differ)."""
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def size_of(sizes: Optional[Mapping], image_id: int, where: str) -> tuple:
    """(width, height) of ``image_id`` from the caller's mapping; DataError when absent."""
    if sizes is None or image_id not in sizes:
        raise DataError(
            f"{where}: boxes are in pixels but the size of image {image_id} is unknown "
            f"(pass sizes={{image_id: (width, height)}}, e.g. read_image_sizes(captions_json))")
    width, height = sizes[image_id]
    return int(width), int(height)


def make_image(where: str, image_id: int, features, boxes, *, units: str,
               width: Optional[int] = None, height: Optional[int] = None,
               stats: Optional[ReadStats] = None) -> ImageFeatures:
    """Validate one image's detector output and normalise its boxes.

    where: the file (and line) for messages; features ``[N, D]`` any real dtype (stored as
    float32; NaN/inf refused); boxes ``[N, 4]`` (x1, y1, x2, y2) in pixels (``units="pixel"``,
    divided by width/height) or already relative (``units="relative"``). Boxes keep their order.
    A box reaching outside the image is clipped to it and counted in ``stats.clipped_boxes``;
    a box with x2 < x1 or y2 < y1, non-finite values, or zero boxes raise :class:`DataError`.
    """
    at = f"{where}: image {image_id}"
    features = np.asarray(features)
    boxes = np.asarray(boxes)
    if features.ndim != 2:
        raise DataError(f"{at}: features have shape {features.shape}, expected [N, D]")
    if features.shape[0] == 0:
        raise DataError(f"{at}: the image has zero boxes")
    if features.dtype.kind not in "fiu":
        raise DataError(f"{at}: features have dtype {features.dtype}, expected float")
    if boxes.shape != (features.shape[0], 4):
        raise DataError(f"{at}: boxes have shape {boxes.shape}, expected [{features.shape[0]}, 4] "
                        f"to match features {features.shape}")
    if boxes.dtype.kind not in "fiu":
        raise DataError(f"{at}: boxes have dtype {boxes.dtype}, expected float")
    features = features.astype(np.float32, copy=False)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        kind = "NaN" if np.isnan(features[row]).any() else "inf"
        raise DataError(f"{at}: features hold {kind} (box {row}; {int(bad.sum())} boxes affected)")
    coords = boxes.astype(np.float64)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{at}: box {row} is not finite: {coords[row].tolist()}")
    bad = (coords[:, 2] < coords[:, 0]) | (coords[:, 3] < coords[:, 1])
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{at}: box {row} has x2 < x1 or y2 < y1: {coords[row].tolist()} "
                        f"(expected x1, y1, x2, y2)")
    if units == "pixel":
        if width is None or height is None or width <= 0 or height <= 0:
            raise DataError(f"{at}: image size {width}x{height} is not positive")
        coords = coords / np.array([width, height, width, height], dtype=np.float64)
    elif units != "relative":
        raise ValueError(f"units must be 'pixel' or 'relative', got {units!r}")
    far = ((coords < -FAR_OUTSIDE) | (coords > 1 + FAR_OUTSIDE)).any(axis=1)
    if far.any():
        row = int(np.argmax(far))
        hint = ("pixel boxes read as relative?" if units == "relative"
                else f"wrong image size {width}x{height}?")
        raise DataError(f"{at}: box {row} lies far outside the image "
                        f"(normalised {coords[row].tolist()}; {hint})")
    clipped = np.clip(coords, 0.0, 1.0)
    n_clipped = int((clipped != coords).any(axis=1).sum())
    if stats is not None:
        stats.clipped_boxes += n_clipped
    return ImageFeatures(image_id=int(image_id), features=features,
                         boxes=clipped.astype(np.float32), width=width, height=height)


def load_json(path, what: str = "JSON file") -> dict:
    """A JSON object from ``path`` (UTF-8; :func:`geocap.data.json_file.read_json`, the one JSON
    loader); DataError naming the file (as ``what``) when it is missing, unreadable or not an object."""
    data = read_json(path, what, DataError)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top, found {type(data).__name__}")
    return data


def int_field(entry, key: str, where: str) -> int:
    """``entry[key]`` when it is a JSON integer; DataError naming ``where`` otherwise."""
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where} has no integer {key!r} (found {value!r})")
    return value
