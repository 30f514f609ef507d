"""The attention record: one image, one caption and the attention a model paid while reading it.

This is the contract between whatever produces attention (``geocap dump`` on a geocap model, or
any other model, or records built in memory by a test) and what consumes it (``geocap.analysis``,
``geocap view``). It depends on numpy alone, so analyses never need the model.

Conventions (L layers, H heads, N objects, T caption positions):

- ``boxes [N, 4]`` float32, normalised (x1, y1, x2, y2); only the image's real objects (no padding).
- ``tokens``: the caption's words as the decoder *produced* them, ending with ``"<eos>"`` unless the
  caption was cut at max_len; row t of every decoder map is the decoding step that predicts
  ``tokens[t]``. Its decoder input is the token before: ``"<bos>"`` for t = 0, else
  ``tokens[t - 1]``. So ``decoder_self[l, h, t, s]`` is the weight step t gives to the input at
  position s (``"<bos>"`` for s = 0, else ``tokens[s - 1]``), with s <= t (causal).
- ``encoder_self [L, H, N, N]``: query object i (row) attending to key object j (column).
- ``decoder_self [L, H, T, T]``, ``cross [L, H, T, N]``: decoding step t attending to inputs / objects.
- Maps are the weights before dropout; rows sum to 1 over valid keys. Any map may be None (not
  recorded). Stored maps are float16; in memory any float dtype is accepted.
- ``*_entropy`` ``[L, H, N]`` / ``[L, H, T]`` float32: entropy in nats of each row, as the fused
  kernels computed it (also present when the maps were not stored).
- ``labels [N]`` (detector / category ids), ``clusters [N]`` (thematic cluster ids),
  ``referents [T]`` (object index each token names, -1 for none): None when unknown.
- ``kind``: ``"reference"`` (teacher-forced reference caption), ``"generated"`` (the model's own
  caption, teacher-forced after decoding) or ``"hypothetical"`` (a reference caption whose nouns
  were swapped to name other objects of the image: ``referents`` are the objects the new words
  name, ``source_referents`` those the original words named; -1 where the token was not swapped).

Objects that stand for no region, and referents that cover several objects (patch-based models,
e.g. ``geocap.hf``; :func:`regular_objects`, :func:`referent_objects`):

- ``extra["special_objects"]``: indices of objects that are not image regions (a ViT's class or
  register tokens). They keep their place in the maps (rows still sum to 1 over all N objects,
  as the model computed them); analyses that compare regions (distance, grounding) leave them out.
- ``extra["patch_grid"]``: ``[rows, cols]`` when the regular objects are a patch grid in row-major
  order (their boxes are its cells).
- ``extra["referent_objects"]``: a list of regions, each a list of object indices. When present,
  ``referents[t] = r`` means token t names region r (the objects ``referent_objects[r]``, e.g. the
  patches an object's box covers) instead of object r; ``referents`` are then indices into this list.
- ``extra["file_name"]``: the image's file (relative to the images folder); ``extra["width"]`` /
  ``extra["height"]``: its size in pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from geocap.errors import DataError

KINDS = ("reference", "generated", "hypothetical")
MAP_NAMES = ("encoder_self", "decoder_self", "cross")
ENTROPY_NAMES = {"encoder_self": "encoder_entropy", "decoder_self": "decoder_entropy", "cross": "cross_entropy"}


@dataclass
class Record:
    """One image and one caption with its attention; see the module docstring for shapes."""

    image_id: int
    boxes: np.ndarray
    tokens: list
    kind: str = "reference"
    caption_id: int = -1
    labels: Optional[np.ndarray] = None
    clusters: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None
    referents: Optional[np.ndarray] = None
    source_referents: Optional[np.ndarray] = None
    encoder_self: Optional[np.ndarray] = None
    decoder_self: Optional[np.ndarray] = None
    cross: Optional[np.ndarray] = None
    encoder_entropy: Optional[np.ndarray] = None
    decoder_entropy: Optional[np.ndarray] = None
    cross_entropy: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    @property
    def num_objects(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def validate(self) -> "Record":
        """Check every present field's shape against N, T and each other; raise ``ValueError``
        naming the image id and the field. Returns self."""
        n, t = self.num_objects, self.num_tokens
        where = f"record of image {self.image_id} (caption {self.caption_id}, {self.kind})"
        if self.kind not in KINDS:
            raise DataError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise DataError(f"{where}: boxes must be [N, 4], got {tuple(self.boxes.shape)}")
        per_object = {"labels": self.labels, "clusters": self.clusters}
        for name, value in per_object.items():
            if value is not None and tuple(value.shape) != (n,):
                raise DataError(f"{where}: {name} must be [N] = [{n}], got {tuple(value.shape)}")
        if self.features is not None and (self.features.ndim != 2 or self.features.shape[0] != n):
            raise DataError(f"{where}: features must be [N, D] with N = {n}, got {tuple(self.features.shape)}")
        for name in ("referents", "source_referents"):
            value = getattr(self, name)
            if value is None:
                continue
            if tuple(value.shape) != (t,):
                raise DataError(f"{where}: {name} must be [T] = [{t}], got {tuple(value.shape)}")
            limit, what = n, "an object index"
            if "referent_objects" in (self.extra or {}):
                limit, what = len(self.extra["referent_objects"]), "an index into extra['referent_objects']"
            if value.size and (value.min() < -1 or value.max() >= limit):
                raise DataError(f"{where}: {name} must be -1 or {what} < {limit}")
        extra = self.extra or {}
        for key in ("special_objects",):
            if key in extra:
                _check_indices(extra[key], n, f"{where}: extra[{key!r}]")
        for r, region in enumerate(extra.get("referent_objects", ())):
            _check_indices(region, n, f"{where}: extra['referent_objects'][{r}]", empty=False)
        if "patch_grid" in extra:
            grid = np.asarray(extra["patch_grid"])
            special = len(extra.get("special_objects", ()))
            if (grid.shape != (2,) or not np.issubdtype(grid.dtype, np.integer) or grid.min() < 1
                    or int(grid[0]) * int(grid[1]) + special != n):
                raise DataError(f"{where}: extra['patch_grid'] must be [rows, cols], ints with rows * cols + "
                                 f"{special} special objects = N = {n}, got {extra['patch_grid']!r}")
        expected = {"encoder_self": (n, n), "decoder_self": (t, t), "cross": (t, n)}
        for name, tail in expected.items():
            layers_heads = None          # a map and its entropies agree; encoder and decoder may differ
            for field_name, shape_tail in ((name, tail), (ENTROPY_NAMES[name], tail[:1])):
                value = getattr(self, field_name)
                if value is None:
                    continue
                if value.ndim != 2 + len(shape_tail) or tuple(value.shape[2:]) != shape_tail:
                    raise DataError(f"{where}: {field_name} must be [L, H, {', '.join(map(str, shape_tail))}], "
                                     f"got {tuple(value.shape)}")
                if layers_heads is None:
                    layers_heads = tuple(value.shape[:2])
                elif tuple(value.shape[:2]) != layers_heads:
                    raise DataError(f"{where}: {field_name} has [L, H] = {tuple(value.shape[:2])}, "
                                     f"{name} has {layers_heads}")
        return self


def _check_indices(values, n: int, where: str, *, empty: bool = True) -> None:
    index = np.asarray(values)
    if index.ndim != 1 or (index.size and (not np.issubdtype(index.dtype, np.integer) or index.min() < 0
                                             or index.max() >= n or len(np.unique(index)) != index.size)):
        raise DataError(f"{where} must be distinct object indices in [0, {n}), got {list(np.ravel(values))[:8]}")
    if not empty and index.size == 0:
        raise DataError(f"{where} is empty: a region covers at least one object")


def regular_objects(record: Record) -> np.ndarray:
    """``[N]`` bool: the objects that are image regions (all but ``extra["special_objects"]``)."""
    mask = np.ones(record.num_objects, dtype=bool)
    special = (record.extra or {}).get("special_objects")
    if special is not None and len(special):
        mask[np.asarray(special, dtype=np.int64)] = False
    return mask


def referent_objects(record: Record, referent: int) -> np.ndarray:
    """The object indices that ``referents[t] = referent`` names: ``extra["referent_objects"][referent]``
    when the record has regions, else the object ``referent`` itself (int64 array)."""
    regions = (record.extra or {}).get("referent_objects")
    if regions is None:
        return np.array([referent], dtype=np.int64)
    return np.asarray(regions[referent], dtype=np.int64)
