"""Reading ``ground_truth.json`` (``geocap synth``) one image at a time, in memory that does not
grow with the file.

The file is one JSON object whose last key is ``images``, a list of per-image objects each
starting with its ``"image_id"`` (see :mod:`geocap.data.synth`). :class:`TruthFile` scans the
file once in blocks for the starts of those objects (a regular expression, no JSON parsing:
about as fast as reading the file), keeps their byte offsets in numpy arrays (16 bytes per
image), parses everything but the images (categories, clusters, relations, parameters) as the
``header``, and parses an image only when asked for it (:meth:`TruthFile.image`, a few recent
ones cached). A 350 MB file of 125k images costs ~2 MB of offsets instead of ~2 GB of dicts.

Errors (bad JSON, another format, a layout other than geocap's, an image id absent) are
:class:`~geocap.errors.DataError` naming the file (and the image id where there is one).
"""
from __future__ import annotations

import array
import json
import os
import re
from collections import OrderedDict

import numpy as np

from geocap.errors import DataError

FORMAT = "geocap-synth-ground-truth"
BLOCK = 8 << 20                  # bytes read at a time while scanning
CACHED = 16                      # parsed images kept (the dump reads an image's captions one after another)
_IMAGE_START = re.compile(rb'\{\s*"image_id"\s*:\s*(-?\d+)')
_IMAGES_KEY = re.compile(rb'"images"\s*:\s*\[\s*$')

__all__ = ["FORMAT", "TruthFile"]


class TruthFile:
    """The ground truth at ``path``, images read on demand.

    ``header``: the file's object without ``images``; ``image_ids``: int64 ``[M]`` in file
    order; ``image(image_id)`` -> that image's dict; ``in image_ids`` via ``image_id in truth``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            starts, ids, size = self._scan()
            with open(self.path, "rb") as fh:
                if not len(starts):
                    self.header = self._whole(fh)
                else:
                    self.header = self._header(fh, int(starts[0]), int(starts[-1]), size)
        except OSError as err:
            raise DataError(f"{self.path}: unreadable ground truth ({err})") from None
        if not isinstance(self.header, dict) or self.header.get("format") != FORMAT:
            raise DataError(f"{self.path}: not a geocap synthetic ground-truth file")
        ends = np.append(starts[1:], self._images_end).astype(np.int64) if len(starts) else starts
        order = np.argsort(ids, kind="stable")
        self.image_ids = ids
        self._sorted_ids, self._starts, self._ends = ids[order], starts[order], ends[order]
        if len(ids) and np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
            dup = int(self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]][0])
            raise DataError(f"{self.path}: image {dup} appears twice")
        self._cache: OrderedDict = OrderedDict()

    # -- scanning
    def _scan(self):
        """(starts, ids, file size): the byte offset and id of every image object."""
        starts, ids = array.array("q"), array.array("q")     # 16 bytes per image, not two Python ints
        offset, carry, last = 0, b"", -1          # carry: the tail of the previous block
        with open(self.path, "rb") as fh:
            while True:
                block = fh.read(BLOCK)
                buffer = carry + block
                base = offset - len(carry)
                for match in _IMAGE_START.finditer(buffer):
                    at = base + match.start()
                    if at <= last:
                        continue
                    if match.end() == len(buffer) and block:       # the id may go on in the next block
                        break
                    starts.append(at)
                    ids.append(int(match.group(1)))
                    last = at
                if not block:
                    break
                offset += len(block)
                carry = buffer[-64:]
        return np.frombuffer(starts, np.int64).copy(), np.frombuffer(ids, np.int64).copy(), offset

    def _whole(self, fh):
        try:
            return json.loads(fh.read().decode("utf-8"))
        except ValueError as err:
            raise DataError(f"{self.path}: unreadable ground truth ({err})") from None

    def _header(self, fh, first: int, last: int, size: int) -> dict:
        """The object without its images: the text before ``"images": [`` and after the list."""
        head = fh.read(first)
        key = _IMAGES_KEY.search(head)
        if key is None:
            raise DataError(f"{self.path}: unreadable ground truth (the images are not the list \"images\")")
        fh.seek(last)
        rest = fh.read(size - last).decode("utf-8")
        try:
            _, end = json.JSONDecoder().raw_decode(rest)
        except ValueError as err:
            raise DataError(f"{self.path}: unreadable ground truth (its last image: {err})") from None
        tail = rest[end:].lstrip()
        if not tail.startswith("]"):
            raise DataError(f"{self.path}: unreadable ground truth (the images list does not end after its last "
                            f"image)")
        self._images_end = last + len(rest[:end].encode("utf-8"))
        try:
            return json.loads(head[:key.start()].decode("utf-8") + '"images":[]' + tail[1:])
        except ValueError as err:
            raise DataError(f"{self.path}: unreadable ground truth ({err})") from None

    # -- images
    def __contains__(self, image_id) -> bool:
        k = np.searchsorted(self._sorted_ids, int(image_id))
        return bool(k < len(self._sorted_ids) and self._sorted_ids[k] == int(image_id))

    def __len__(self) -> int:
        return len(self.image_ids)

    def image(self, image_id) -> dict:
        """The dict of ``image_id`` (DataError naming it when the file has no such image)."""
        image_id = int(image_id)
        cached = self._cache.get(image_id)
        if cached is not None:
            self._cache.move_to_end(image_id)
            return cached
        if image_id not in self:
            raise DataError(f"{self.path}: no ground truth for image {image_id}")
        k = int(np.searchsorted(self._sorted_ids, image_id))
        start, end = int(self._starts[k]), int(self._ends[k])
        with open(self.path, "rb") as fh:
            fh.seek(start)
            text = fh.read(end - start).decode("utf-8")
        try:
            data, stop = json.JSONDecoder().raw_decode(text)
        except ValueError as err:
            raise DataError(f"{self.path}: image {image_id}: unreadable ground truth ({err})") from None
        if not isinstance(data, dict) or data.get("image_id") != image_id or text[stop:].strip() not in ("", ","):
            raise DataError(f"{self.path}: image {image_id}: unreadable ground truth (not one image object)")
        self._cache[image_id] = data
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return data
