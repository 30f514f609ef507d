"""bottom-up-attention TSV files (Anderson et al.'s ``generate_tsv.py`` output).

One image per line, tab-separated, no header, in this order::

    image_id  image_w  image_h  num_boxes  boxes  features

``boxes`` is base64 of float32 ``[num_boxes, 4]`` (x1, y1, x2, y2) in pixels; ``features`` is
base64 of float32 ``[num_boxes, D]`` (D = 2048 for the released files). Files come with a fixed
36 boxes per image or an adaptive 10-100. A line is ~400 kB for 36 boxes, far above the csv
module's default field limit (131072 characters), so reading raises that (process-wide) limit.
"""
from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from typing import Iterable, Iterator, Optional

import numpy as np

from ..items import DataError, ImageFeatures
from ._common import FeatureStream, ReadStats, check_on_error, handle, make_image, requested_ids

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")

# csv.field_size_limit takes a C long: sys.maxsize overflows it on Windows.
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


def read_bottom_up_tsv(path, *, image_ids: Optional[Iterable[int]] = None,
                       feature_dim: Optional[int] = None, on_error: str = "raise",
                       stats: Optional[ReadStats] = None) -> FeatureStream:
    """Stream the images of a bottom-up-attention TSV file, one line at a time.

    Yields :class:`ImageFeatures` in file order: features float32 ``[N, D]`` exactly as stored;
    boxes float32 ``[N, 4]`` divided by (image_w, image_h, image_w, image_h), in the file's
    order (not re-sorted), clipped to the image where they reach outside it (counted in
    ``stats.clipped_boxes``); width/height from the line.

    image_ids: only these images (others are passed over undecoded); any that the file lacks
    are reported when the file ends. feature_dim: D to require; by default the first image's D,
    which every later line must match. A second line for an image id already read is an
    error (the first one has been yielded). on_error: "raise" stops at the first bad line with a
    :class:`DataError` naming the file, line and image id; "skip" counts it in ``stats`` and
    goes on. stats: a :class:`ReadStats` to fill (e.g. one shared by several files); by
    default a new one, at ``stream.stats``.
    """
    check_on_error(on_error)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no bottom-up TSV file at {path}")
    stats = ReadStats() if stats is None else stats
    wanted = requested_ids(image_ids)
    records = _records(path, None if wanted is None else set(wanted), feature_dim, on_error, stats)
    return FeatureStream(path, records, stats)


def _records(path, wanted, feature_dim, on_error, stats) -> Iterator[ImageFeatures]:
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    seen = {}  # image id -> line of its first occurrence
    dim = feature_dim
    # errors="replace": a stray non-ASCII byte becomes U+FFFD, which the strict base64
    # decoding below then reports for that line alone.
    with open(path, newline="", encoding="ascii", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                handle(DataError(f"{path} line {reader.line_num}: unreadable line ({err})"),
                       on_error, stats)
                continue
            where = f"{path} line {reader.line_num}"
            if not row or (reader.line_num == 1 and row[0] == FIELDS[0]):
                continue  # a blank line, or a header some re-writers add
            try:
                image_id = _int(row[0], where, "image id", "?")
            except DataError as err:
                handle(err, on_error, stats)
                continue
            if wanted is not None and image_id not in wanted:
                continue
            try:
                if image_id in seen:
                    raise DataError(f"{where}: image {image_id}: duplicate image id "
                                    f"(first at line {seen[image_id]})")
                seen[image_id] = reader.line_num
                record = _parse(row, image_id, where, dim, stats)
            except DataError as err:
                handle(err, on_error, stats)
                continue
            dim = record.features.shape[1]
            stats.images += 1
            yield record
    if wanted is not None:
        for image_id in sorted(wanted - seen.keys()):
            handle(DataError(f"{path}: image {image_id}: requested but not in the file"),
                   on_error, stats)


def _parse(row, image_id, where, dim, stats) -> ImageFeatures:
    at = f"{where}: image {image_id}"
    if len(row) != len(FIELDS):
        raise DataError(f"{at}: {len(row)} fields, expected {len(FIELDS)} "
                        f"({', '.join(FIELDS)}); truncated line?")
    width = _int(row[1], where, "image_w", image_id)
    height = _int(row[2], where, "image_h", image_id)
    n = _int(row[3], where, "num_boxes", image_id)
    if n <= 0:
        raise DataError(f"{at}: the image has zero boxes (num_boxes = {n})")
    boxes = _decode(row[4], at, "boxes")
    if boxes.size != n * 4:
        raise DataError(f"{at}: boxes field holds {boxes.size * 4} bytes, expected num_boxes * 16 "
                        f"= {n * 16} (truncated line or wrong num_boxes?)")
    features = _decode(row[5], at, "features")
    if features.size % n:
        raise DataError(f"{at}: features field holds {features.size * 4} bytes, not a multiple "
                        f"of num_boxes * 4 = {n * 4} (truncated line or wrong num_boxes?)")
    d = features.size // n
    if dim is not None and d != dim:
        raise DataError(f"{at}: features field holds {features.size * 4} bytes = {n} boxes x {d} "
                        f"float32, expected D = {dim} (truncated line?)")
    return make_image(where, image_id, features.reshape(n, d), boxes.reshape(n, 4),
                      units="pixel", width=width, height=height, stats=stats)


def _decode(text: str, at: str, name: str) -> np.ndarray:
    """Little-endian float32 values of a base64 field (a writable copy)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        hint = " (it looks like a Python bytes repr b'...')" if text.startswith("b'") else ""
        raise DataError(f"{at}: {name} field is not valid base64: {err}{hint}") from None
    if len(raw) % 4:
        raise DataError(f"{at}: {name} field holds {len(raw)} bytes, not whole float32 values "
                        f"(truncated line?)")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _int(text: str, where: str, name: str, image_id) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{where}: image {image_id}: {name} {text[:40]!r} is not an integer") from None
