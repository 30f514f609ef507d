"""The in-memory records every reader yields and every writer takes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from geocap.errors import DataError  # noqa: F401 -- re-exported: readers and writers raise it from here


@dataclass
class ImageFeatures:
    """One image's detector output.

    features: float32 ``[N, D]``; boxes: float32 ``[N, 4]`` (x1, y1, x2, y2) normalised to
    [0, 1], in the source file's order; width/height: the image size in pixels when known;
    labels: int64 ``[N]`` detector class ids when known (names live with the store).
    """
    image_id: int
    features: np.ndarray
    boxes: np.ndarray
    width: Optional[int] = None
    height: Optional[int] = None
    labels: Optional[np.ndarray] = None


@dataclass
class Caption:
    """One reference caption. ``tokens`` are lower-cased words when the source has them."""
    image_id: int
    caption_id: int
    text: str
    tokens: Optional[list] = None


@dataclass
class CaptionSet:
    """Captions with the split of each image ("train", "val" or "test"; Karpathy's restval
    counts as train). ``splits`` may be empty when the source has none."""
    captions: list = field(default_factory=list)
    splits: dict = field(default_factory=dict)
