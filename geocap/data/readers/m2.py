"""meshed-memory transformer's detections file (``coco_detections.hdf5``): one HDF5 file with,
per image, ``<id>_features`` float32 ``[N, 2048]`` and ``<id>_boxes`` float32 ``[N, 4]``
(x1, y1, x2, y2) in pixels (plus ``<id>_cls_prob`` and others, which are not read).
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Iterator, Mapping, Optional


from ..hdf5_errors import named_hdf5_errors, open_hdf5
from ..items import DataError, ImageFeatures
from ._common import (FeatureStream, ReadStats, check_on_error, handle, make_image,
                      requested_ids, size_of)

_FEATURES = re.compile(r"^(\d+)_features$")
_BOXES = re.compile(r"^(\d+)_boxes$")


def read_m2_hdf5(path, *, sizes: Optional[Mapping[int, tuple]] = None,
                 image_ids: Optional[Iterable[int]] = None, on_error: str = "raise",
                 stats: Optional[ReadStats] = None) -> FeatureStream:
    """Stream images from a meshed-memory style HDF5 file.

    Boxes are required (an image without ``<id>_boxes`` is a :class:`DataError` naming it) and
    in pixels, so ``sizes`` {image_id: (width, height)} must give every image's size (e.g.
    :func:`read_image_sizes` of the COCO annotations); an image without one is a DataError
    naming it. image_ids: these images in this order (one absent from the file is an error for
    that image); by default every ``<digits>_features`` and ``<digits>_boxes`` dataset in
    ascending id order (two for one id, e.g. ``7_features`` and ``007_features``, are an error for
    that image, and so are boxes without their features).

    Yields :class:`ImageFeatures`: features float32 ``[N, D]`` as stored; boxes float32
    ``[N, 4]`` normalised, in the file's order (not re-sorted), clipped to the image where
    they reach outside it (counted in ``stats.clipped_boxes``). on_error / stats: as for
    :func:`read_bottom_up_tsv`.
    """
    check_on_error(on_error)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HDF5 file at {path}")
    stats = ReadStats() if stats is None else stats
    wanted = requested_ids(image_ids)
    return FeatureStream(path, _records(path, sizes, wanted, on_error, stats), stats)


def _records(path, sizes, wanted, on_error, stats) -> Iterator[ImageFeatures]:
    f = open_hdf5(path)
    with f, named_hdf5_errors(str(path), "HDF5 file"):
        if wanted is not None:
            items = [(i, [str(i)]) for i in wanted]
        else:
            by_id, boxes_only = {}, {}
            for key in f.keys():
                m = _FEATURES.match(key)
                if m:
                    by_id.setdefault(int(m.group(1)), []).append(m.group(1))
                m = _BOXES.match(key)
                if m:
                    boxes_only.setdefault(int(m.group(1)), [m.group(1)])
            for image_id, prefixes in boxes_only.items():   # boxes whose features are missing
                by_id.setdefault(image_id, prefixes)
            items = sorted(by_id.items())
            if not items:
                keys = sorted(f.keys())
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                raise DataError(f"{path}: no '<image id>_features' dataset: not a meshed-memory features file "
                                f"(top-level keys: {shown or 'none'})")
        for image_id, prefixes in items:
            try:
                record = _image(f, path, image_id, prefixes, sizes, stats)
            except DataError as err:
                handle(err, on_error, stats)
                continue
            stats.images += 1
            yield record


def _image(f, path, image_id, prefixes, sizes, stats) -> ImageFeatures:
    at = f"{path}: image {image_id}"
    if len(prefixes) > 1:
        raise DataError(f"{at}: duplicate image id (datasets "
                        f"{', '.join(p + '_features' for p in sorted(prefixes))})")
    prefix = prefixes[0]
    with named_hdf5_errors(at, "datasets"):
        if f"{prefix}_features" not in f:
            why = f"the file has its {prefix}_boxes" if f"{prefix}_boxes" in f else "image not in the file"
            raise DataError(f"{at}: no {prefix}_features dataset ({why})")
        if f"{prefix}_boxes" not in f:
            raise DataError(f"{at}: no {prefix}_boxes dataset; boxes are required")
        width, height = size_of(sizes, image_id, str(path))
        try:
            features, boxes = f[f"{prefix}_features"][()], f[f"{prefix}_boxes"][()]
        except (TypeError, AttributeError) as err:    # a group or a link where a dataset belongs
            raise DataError(f"{at}: unreadable datasets ({err})") from None
    return make_image(str(path), image_id, features, boxes,
                      units="pixel", width=width, height=height, stats=stats)
