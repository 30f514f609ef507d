"""The folders and files of ORT / self-critical.pytorch (``scripts/prepro_*.py`` output).

Features: ``cocobu_att/<id>.npz``, one array ``feat`` (``z`` in some copies) float32
``[N, 2048]``. Boxes: ``cocobu_box/<id>.npy`` float32 ``[N, 4]`` (x1, y1, x2, y2) in pixels, or
``cocobu_box_relative/<id>.npy`` already divided by the image size. Captions:
``cocotalk.json`` (``ix_to_word``: {"1": word, ...}; ``images``: [{id, split, file_path, ...}])
and ``cocotalk_label.h5`` (``labels`` int ``[M, L]``, 0 = padding after the last word;
``label_start_ix``/``label_end_ix`` ``[len(images)]``, 1-indexed and inclusive rows of
``labels`` for each image, in ``images`` order).
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Optional

import numpy as np

from ..hdf5_errors import named_hdf5_errors, open_hdf5
from ..items import Caption, CaptionSet, DataError, ImageFeatures
from ._common import (FeatureStream, ReadStats, check_on_error, handle, int_field, load_json,
                      make_image, requested_ids, size_of)
from .karpathy import split_name

FEATURE_KEYS = ("feat", "z")
_ID_FILE = re.compile(r"^(\d+)\.npz$")
_BOX_FILE = re.compile(r"^(\d+)\.npy$")


def read_npz_dir(feature_dir, box_dir, *, box_units: str,
                 sizes: Optional[Mapping[int, tuple]] = None,
                 image_ids: Optional[Iterable[int]] = None, on_error: str = "raise",
                 stats: Optional[ReadStats] = None) -> FeatureStream:
    """Stream images from a ``<id>.npz`` feature folder and its ``<id>.npy`` box folder.

    box_units: "pixel" (``cocobu_box``: divided by the size of each image, which ``sizes``
    {image_id: (width, height)} must give, else a :class:`DataError` naming the image) or
    "relative" (``cocobu_box_relative``; ``sizes`` optional, only fills width/height).
    image_ids: these images in this order (a missing file is an error for that image); by
    default every ``<digits>.npz`` in ``feature_dir`` and every ``<digits>.npy`` in ``box_dir``
    in ascending id order (two files for one id, e.g. ``7.npz`` and ``007.npz``, are an error for
    that image, and so is a box file without its feature file).

    Yields :class:`ImageFeatures`: features float32 ``[N, D]`` as stored; boxes float32
    ``[N, 4]`` normalised, in the file's order (not re-sorted), clipped to the image where
    they reach outside it (counted in ``stats.clipped_boxes``). on_error / stats: as for
    :func:`read_bottom_up_tsv`.
    """
    check_on_error(on_error)
    if box_units not in ("pixel", "relative"):
        raise ValueError(f"box_units must be 'pixel' or 'relative', got {box_units!r}")
    feature_dir, box_dir = Path(feature_dir), Path(box_dir)
    for d in (feature_dir, box_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"no folder at {d}")
    stats = ReadStats() if stats is None else stats
    wanted = requested_ids(image_ids)
    records = _npz_records(feature_dir, box_dir, box_units, sizes, wanted, on_error, stats)
    return FeatureStream(feature_dir, records, stats)


def _npz_records(feature_dir, box_dir, box_units, sizes, wanted, on_error, stats
                 ) -> Iterator[ImageFeatures]:
    if wanted is not None:
        items = [(i, [f"{i}.npz"]) for i in wanted]
    else:
        by_id = {}
        for name in sorted(os.listdir(feature_dir)):
            m = _ID_FILE.match(name)
            if m:
                by_id.setdefault(int(m.group(1)), []).append(name)
        for name in sorted(os.listdir(box_dir)):        # boxes whose features are missing
            m = _BOX_FILE.match(name)
            if m:
                by_id.setdefault(int(m.group(1)), [m.group(1) + ".npz"])
        items = sorted(by_id.items())
    for image_id, names in items:
        try:
            record = _npz_image(feature_dir, box_dir, image_id, names, box_units, sizes, stats)
        except DataError as err:
            handle(err, on_error, stats)
            continue
        stats.images += 1
        yield record


def _npz_image(feature_dir, box_dir, image_id, names, box_units, sizes, stats) -> ImageFeatures:
    feature_path = feature_dir / names[0]
    if len(names) > 1:
        raise DataError(f"{feature_dir}: image {image_id}: duplicate image id "
                        f"(files {', '.join(names)})")
    if not feature_path.is_file():
        box_path = box_dir / (feature_path.stem + ".npy")
        beside = f" (its box file {box_path} is there)" if box_path.is_file() else ""
        raise DataError(f"{feature_path}: image {image_id}: no feature file for this image{beside}")
    box_path = box_dir / (feature_path.stem + ".npy")
    if not box_path.is_file():
        raise DataError(f"{box_path}: image {image_id}: no box file for this image")
    try:
        with np.load(feature_path) as archive:
            key = next((k for k in FEATURE_KEYS if k in archive.files), None)
            if key is None:
                raise DataError(f"{feature_path}: image {image_id}: no array named "
                                f"{' or '.join(FEATURE_KEYS)} (found {archive.files})")
            features = archive[key]
        boxes = np.load(box_path)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{feature_path}: image {image_id}: unreadable ({err})") from None
    where = str(feature_path)
    width = height = None
    if box_units == "pixel" or (sizes is not None and image_id in sizes):
        width, height = size_of(sizes, image_id, str(box_path))
    try:
        return make_image(where, image_id, features, boxes, units=box_units,
                          width=width, height=height, stats=stats)
    except DataError as err:
        raise DataError(f"{err} [boxes: {box_path}]") from None


class CocotalkCaptions(NamedTuple):
    """``read_cocotalk``'s result: the captions and ``vocab``, where ``vocab[k]`` is the word
    of label index ``k + 1`` (index 0 is padding)."""
    captions: CaptionSet
    vocab: list


def read_cocotalk(json_path, label_path) -> CocotalkCaptions:
    """Decode ``cocotalk_label.h5`` with the vocabulary and images of ``cocotalk.json``.

    Every caption becomes a :class:`Caption` with ``tokens`` the words before the first 0
    (labels are already lower-cased, truncated to L words, rare words as the file's UNK
    token), ``text`` those tokens joined by spaces, and ``caption_id`` its 0-based row in
    ``labels`` (the files keep no caption ids). Captions come in ``images`` order. Splits come
    from the images' ``split`` (restval counts as train); images without one are left out of
    ``splits``. Bad input (an image without captions, index ranges outside ``labels``, a word
    index outside the vocabulary, duplicate image ids) raises :class:`DataError`.
    """
    info = load_json(json_path)
    vocab = _vocabulary(json_path, info.get("ix_to_word"))
    images = info.get("images")
    if not isinstance(images, list):
        raise DataError(f"{json_path}: no 'images' list")
    f = open_hdf5(label_path, "cocotalk label file")
    with f, named_hdf5_errors(label_path, "cocotalk label file"):
        missing = [n for n in ("labels", "label_start_ix", "label_end_ix") if n not in f]
        if missing:
            raise DataError(f"{label_path}: not a cocotalk label file (missing {', '.join(missing)})")
        labels = f["labels"][()]
        starts = f["label_start_ix"][()]
        ends = f["label_end_ix"][()]
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise DataError(f"{label_path}: labels have shape {labels.shape} and dtype {labels.dtype}, "
                        f"expected int [M, L]")
    if not len(starts) == len(ends) == len(images):
        raise DataError(f"{label_path}: {len(starts)} label_start_ix and {len(ends)} label_end_ix "
                        f"entries for {len(images)} images in {json_path}")
    if labels.size and (labels.min() < 0 or labels.max() > len(vocab)):
        row = int(np.argmax(((labels < 0) | (labels > len(vocab))).any(axis=1)))
        raise DataError(f"{label_path}: labels row {row} holds a word index outside 1..{len(vocab)} "
                        f"(image {_owner(row, starts, ends, images)})")
    words = [None] + vocab
    rows = labels.tolist()
    out = CaptionSet()
    seen = set()
    for i, image in enumerate(images):
        image_id = int_field(image, "id", f"{json_path}: images[{i}]")
        if image_id in seen:
            raise DataError(f"{json_path}: image {image_id}: duplicate image id")
        seen.add(image_id)
        if image.get("split") is not None:
            out.splits[image_id] = split_name(image["split"], json_path, image_id)
        start, end = int(starts[i]), int(ends[i])
        if not 1 <= start <= end <= len(rows):
            raise DataError(f"{label_path}: image {image_id}: label rows {start}..{end} "
                            f"(1-indexed, inclusive) are empty or outside 1..{len(rows)}")
        for r in range(start - 1, end):
            row = rows[r]
            n = row.index(0) if 0 in row else len(row)
            tokens = [words[k] for k in row[:n]]
            out.captions.append(Caption(image_id=image_id, caption_id=r,
                                        text=" ".join(tokens), tokens=tokens))
    return CocotalkCaptions(out, vocab)


def _vocabulary(json_path, ix_to_word) -> list:
    if not isinstance(ix_to_word, dict) or not ix_to_word:
        raise DataError(f"{json_path}: no 'ix_to_word' mapping")
    try:
        by_index = {int(k): v for k, v in ix_to_word.items()}
    except ValueError:
        raise DataError(f"{json_path}: ix_to_word has a key that is not an integer") from None
    if sorted(by_index) != list(range(1, len(by_index) + 1)):
        raise DataError(f"{json_path}: ix_to_word keys are not 1..{len(by_index)}")
    return [by_index[k] for k in range(1, len(by_index) + 1)]


def _owner(row, starts, ends, images):
    for i, (s, e) in enumerate(zip(starts, ends)):
        if s - 1 <= row < e:
            return images[i].get("id", "?")
    return "?"

